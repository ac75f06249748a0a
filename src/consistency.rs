//! The consumer side of the replay consistency protocol: how a consumer that
//! reads a stream receiving both live records and replayed copies of old ones
//! ends up with the same state per key as if it had read the source once.
//!
//! A replay does not stop or mediate the stream: new records keep arriving
//! while old ones are replayed. The protocol (full text, formats and diagrams
//! in `docs/replay-consistency.md`) has three parts:
//!
//! 1. **Horizon.** A replay fixes a horizon `H` when it starts — each shard's
//!    tip at that moment — and replays nothing past it. The horizon is stored
//!    in the replay's manifest, so a resumed replay uses the same one.
//! 2. **Annotation.** Every replayed record carries its original [`Position`]
//!    in an [`Annotation`]: spliced into the payload's top-level JSON object
//!    ([`annotate_json`]) or, for anything else, in an envelope that wraps
//!    the payload in base64 ([`envelope`]). [`decode`] tells them apart.
//! 3. **Consumer rule.** A consumer keeps, per key, the greatest position it
//!    has applied, and applies a record only when its position is greater
//!    ([`Applier`]). A live record uses its own position in the stream it is
//!    read from; a replayed one the original position from its annotation.
//!    `force_overwrite` lets a replayed record also replace the value of a key
//!    whose held position is at or after its own; the held position is kept.
//!
//! ```text
//!   one source shard (k@n: a record of key k at position n)
//!   ──k1@1──k2@2──k1@3──k2@4──┤H├──k1@7──k2@8──▶   live writes go on after H
//!                              │
//!   the replay starts at H and sends copies of records ≤ H only:
//!                              k1@1'  k2@2'  k1@3'  k2@4'
//!   a consumer reads them interleaved with the new writes:
//!                              k1@1'  k1@7  k2@2'  k1@3'  k2@8  k2@4'
//!   holding k1@3 and k2@4:     stale  apply stale  stale  apply stale  ⇒ k1@7, k2@8
//!
//!   consumer decision for a record of key k at position p (a delete keeps a
//!   marker with its position: [`Applier::offer_delete`]):
//!     held[k] absent or p > held[k] ? ──yes──▶ apply; held[k] := p
//!        │ no (p ≤ held[k]; p = held[k] is a duplicate)
//!     replayed and force_overwrite ? ──yes──▶ apply the value; held[k] unchanged
//!        │ no
//!     stale: drop
//! ```
//!
//! **Why it converges.** Positions are totally ordered ([`Position`]:
//! lineage depth, shard, sequence number, sub-sequence number — the order
//! Kinesis promises for a key; arrival times play no part). Every replayed
//! record was in the stream before the replay started, so its position is at
//! or before `H`; every record written after the replay started is after `H`
//! in its key's shard lineage. A
//! replayed copy therefore can never replace a newer write, and an equal
//! position (the same record seen twice, e.g. a duplicate from a resumed
//! replay) is stale. Each key's held position only grows, and the record that
//! holds the greatest position for a key — the last write to that key in the
//! source — is applied whenever it is seen, so once every record has been
//! seen the state per key equals the last write per key, whatever the
//! interleaving.
//!
//! **`force_overwrite` caveat.** A forced replay is for repairing consumer
//! state (e.g. after a bad deployment wrote wrong values). It rewrites values
//! without raising the held position, so newer live records still win and
//! older ones still lose — but a key that was written after the horizon and
//! whose older original is then force-replayed shows the older value until
//! that key's next write.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::record::{Record, cmp_sequence};

/// The default name of the member that carries the [`Annotation`].
pub const DEFAULT_FIELD: &str = "_fluxcap";

/// The version of the envelope form (the annotation's `envelope` member).
pub const ENVELOPE_VERSION: u32 = 1;

/// A record's place in a stream's history, totally ordered across shards.
///
/// Compared by `(lineage_depth, shard_id, sequence_number,
/// subsequence_number)` in that order; sequence numbers are compared
/// numerically as decimal strings (they can exceed `u128`). This is the
/// order Kinesis does promise: within a shard, sequence numbers increase; a
/// child shard's records come after its parents' (a child is deeper, see
/// [`lineage_depths`]). The records of one partition key (or explicit hash
/// key) are always in one shard or in a chain of ancestors, so for them this
/// is the true write order. Arrival times play no part: Kinesis does not
/// promise that they increase, even within a shard. Shards that are not
/// ancestors of one another (siblings after a split) have no true order
/// between them; they are ordered by depth and then shard id, which is
/// arbitrary but the same everywhere (compaction, replay order, annotations,
/// [`Applier`]). Equality follows the order (`"0100"` and `"100"` are the
/// same sequence number). [`position_key`] is the same order as bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Position {
    /// Approximate arrival timestamp, epoch milliseconds UTC (information
    /// only: it does not take part in the order).
    pub arrival_ms: i64,
    /// Depth of the shard in the stream's lineage ([`lineage_depths`]).
    pub lineage_depth: u32,
    /// Shard id.
    pub shard_id: String,
    /// Exact decimal sequence number.
    pub sequence_number: String,
    /// Index inside a KPL aggregate; 0 for plain records.
    pub subsequence_number: i64,
}

impl Position {
    /// The position of a record read from a stream, given its shard's lineage depth.
    pub fn of_record(record: &Record, lineage_depth: u32) -> Self {
        Position {
            arrival_ms: record.arrival_ms,
            lineage_depth,
            shard_id: record.shard_id.to_string(),
            sequence_number: record.sequence_number.to_string(),
            subsequence_number: record.subsequence_number,
        }
    }
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> Ordering {
        self.lineage_depth
            .cmp(&other.lineage_depth)
            .then_with(|| self.shard_id.cmp(&other.shard_id))
            .then_with(|| cmp_sequence(&self.sequence_number, &other.sequence_number))
            .then(self.subsequence_number.cmp(&other.subsequence_number))
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Position {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Position {}

/// The [`Position`] order as bytes: `position_key(a…) < position_key(b…)`
/// exactly when the positions compare so (SQL engines sort and aggregate
/// it as one binary value). Depth (4 bytes, big-endian), the shard id and a
/// NUL (shard ids hold no NUL), the sequence number without leading zeros
/// prefixed by its length (2 bytes), and the sub-sequence number (8 bytes,
/// sign bit flipped).
pub fn position_key(
    lineage_depth: u32,
    shard_id: &str,
    sequence_number: &str,
    sub: i64,
) -> Vec<u8> {
    let seq = sequence_number.trim_start_matches('0');
    let len = u16::try_from(seq.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(4 + shard_id.len() + 1 + 2 + seq.len() + 8);
    k.extend_from_slice(&lineage_depth.to_be_bytes());
    k.extend_from_slice(shard_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(seq.as_bytes());
    k.extend_from_slice(&((sub as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// The parts of a [`position_key`]: (lineage depth, shard, sequence number
/// without leading zeros, sub-sequence number).
pub fn parse_position_key(key: &[u8]) -> Option<(u32, String, String, i64)> {
    let depth = u32::from_be_bytes(key.get(..4)?.try_into().ok()?);
    let rest = key.get(4..)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    let shard = String::from_utf8(rest[..nul].to_vec()).ok()?;
    let rest = rest.get(nul + 1..)?;
    let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let seq = String::from_utf8(rest.get(2..2 + len)?.to_vec()).ok()?;
    let sub = u64::from_be_bytes(rest.get(2 + len..2 + len + 8)?.try_into().ok()?);
    let seq = if seq.is_empty() { "0".to_string() } else { seq };
    Some((depth, shard, seq, (sub ^ (1 << 63)) as i64))
}

/// The lineage depth of every listed shard: 0 for a shard without parents,
/// otherwise 1 + the greatest depth of its parents. A parent that is not
/// listed (it aged out of the stream's retention) counts as a root of depth 0.
///
/// Input: `(shard id, parent, adjacent parent)` as ListShards reports them.
/// A malformed lineage with a cycle does not loop: the edge closing the cycle
/// is treated like an unknown parent.
pub fn lineage_depths(shards: &[(String, Option<String>, Option<String>)]) -> HashMap<String, u32> {
    let parents: HashMap<&str, Vec<&str>> = shards
        .iter()
        .map(|(id, p, a)| {
            let ps = p.iter().chain(a.iter()).map(String::as_str).collect();
            (id.as_str(), ps)
        })
        .collect();
    let mut depth: HashMap<String, u32> = HashMap::with_capacity(parents.len());
    let mut visiting: HashSet<&str> = HashSet::new();
    for (id, _, _) in shards {
        // Iterative depth-first walk (lineages can be long); `true` marks a
        // shard whose parents have all been pushed, so it can be computed.
        let mut stack: Vec<(&str, bool)> = vec![(id.as_str(), false)];
        while let Some((s, ready)) = stack.pop() {
            if depth.contains_key(s) {
                continue;
            }
            let ps = parents.get(s).map(Vec::as_slice).unwrap_or(&[]);
            if ready {
                let d = if ps.is_empty() {
                    0
                } else {
                    1 + ps
                        .iter()
                        .map(|p| depth.get(*p).copied().unwrap_or(0))
                        .max()
                        .unwrap_or(0)
                };
                visiting.remove(s);
                depth.insert(s.to_string(), d);
            } else if visiting.insert(s) {
                stack.push((s, true));
                for p in ps {
                    if parents.contains_key(p) && !depth.contains_key(*p) && !visiting.contains(p) {
                        stack.push((p, false));
                    }
                }
            }
        }
    }
    depth
}

/// The lineage depths a replay annotates with, so that they mean the same
/// as a consumer's [`lineage_depths`] of the stream's ListShards answer.
///
/// `listed`: the shards ListShards reports now (what a consumer sees);
/// `archived`: shards known only from the archive (they aged out of the
/// stream's retention). A listed shard gets exactly the consumer's depth.
/// An archived shard gets its depth in the archive's fuller lineage, capped
/// below every descendant that is listed (and below its archived children),
/// never under 0: so a copy of an aged-out ancestor's record always sorts
/// before the live records of its listed descendants, as the consumer
/// computes them. (Two aged-out generations can both be capped to 0; their
/// records then compare by shard id.)
pub fn replay_depths(
    listed: &[(String, Option<String>, Option<String>)],
    archived: &[(String, Option<String>, Option<String>)],
) -> HashMap<String, u32> {
    let mut depth = lineage_depths(listed);
    let all: Vec<_> = listed.iter().chain(archived).cloned().collect();
    let full = lineage_depths(&all);
    let parents: HashMap<&str, Vec<&str>> = all
        .iter()
        .map(|(id, p, a)| {
            (
                id.as_str(),
                p.iter().chain(a.iter()).map(String::as_str).collect(),
            )
        })
        .collect();
    let mut cap: HashMap<String, u32> = archived
        .iter()
        .map(|(id, _, _)| (id.clone(), full.get(id).copied().unwrap_or(0)))
        .collect();
    // Walk up from every listed shard: each archived ancestor is capped one
    // below the shard it was reached from (the walk only ever lowers caps,
    // so it ends).
    let mut stack: Vec<(&str, u32)> = listed
        .iter()
        .map(|(id, _, _)| (id.as_str(), depth.get(id).copied().unwrap_or(0)))
        .collect();
    while let Some((s, d)) = stack.pop() {
        for p in parents.get(s).map(Vec::as_slice).unwrap_or(&[]) {
            let Some(c) = cap.get_mut(*p) else { continue };
            let below = d.saturating_sub(1);
            if below < *c {
                *c = below;
                stack.push((p, below));
            }
        }
    }
    depth.extend(cap);
    depth
}

/// What a replayed record carries about its original.
///
/// Serialised as a JSON object with exactly these member names; consumers in
/// other languages read them (see `docs/replay-consistency.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotation {
    /// Id of the replay that sent this copy.
    pub replay_id: String,
    /// The stream the original was read from.
    pub stream: String,
    /// The original's shard.
    pub shard_id: String,
    /// Lineage depth of the original's shard.
    pub lineage_depth: u32,
    /// The original's exact decimal sequence number.
    pub sequence_number: String,
    /// The original's index inside a KPL aggregate; 0 for plain records.
    pub subsequence_number: i64,
    /// The original's arrival time, RFC 3339 UTC with milliseconds
    /// (`2026-11-26T02:59:01.123Z`); for people — `arrival_ms` is authoritative.
    #[serde(default)]
    pub arrival: String,
    /// The original's arrival time, epoch milliseconds UTC.
    pub arrival_ms: i64,
    /// The replay asked consumers to overwrite values at or after this position.
    #[serde(default)]
    pub force_overwrite: bool,
    /// Free-form labels given to the replay.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// [`ENVELOPE_VERSION`] in the envelope form; absent in the JSON form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<u32>,
}

impl Annotation {
    /// The annotation of a replayed copy of `record`, read from `stream` in a
    /// shard of the given lineage depth.
    pub fn for_record(
        replay_id: &str,
        stream: &str,
        record: &Record,
        lineage_depth: u32,
        force_overwrite: bool,
    ) -> Self {
        Annotation {
            replay_id: replay_id.to_string(),
            stream: stream.to_string(),
            shard_id: record.shard_id.to_string(),
            lineage_depth,
            sequence_number: record.sequence_number.to_string(),
            subsequence_number: record.subsequence_number,
            arrival: rfc3339_ms(record.arrival_ms),
            arrival_ms: record.arrival_ms,
            force_overwrite,
            annotations: BTreeMap::new(),
            envelope: None,
        }
    }

    /// The original's position.
    pub fn position(&self) -> Position {
        Position {
            arrival_ms: self.arrival_ms,
            lineage_depth: self.lineage_depth,
            shard_id: self.shard_id.clone(),
            sequence_number: self.sequence_number.clone(),
            subsequence_number: self.subsequence_number,
        }
    }

    /// The annotation as JSON, with `envelope` set for the envelope form and
    /// absent otherwise.
    fn to_json(&self, envelope: bool) -> Vec<u8> {
        let want = envelope.then_some(ENVELOPE_VERSION);
        let out = if self.envelope == want {
            serde_json::to_vec(self)
        } else {
            serde_json::to_vec(&Annotation {
                envelope: want,
                ..self.clone()
            })
        };
        // Serialising strings, integers and a string map cannot fail.
        out.unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// Epoch milliseconds as RFC 3339 UTC with milliseconds and `Z`; empty when
/// out of range.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// A JSON string literal (quoted and escaped).
fn json_string(s: &str) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_else(|_| b"\"\"".to_vec())
}

/// The offset of the opening `{` after optional UTF-8 BOM and JSON whitespace.
fn skip_prefix(data: &[u8]) -> usize {
    let mut i = if data.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    while data.get(i).is_some_and(|b| b" \t\r\n".contains(b)) {
        i += 1;
    }
    i
}

/// The JSON form: `payload`'s top-level object with one more member, `field`,
/// holding the annotation, spliced in right after the opening `{` so every
/// other byte is kept verbatim.
///
/// `None` when the payload is not a JSON object (after an optional BOM and
/// whitespace) or already has a top-level member named `field`: use
/// [`envelope`] then. The payload is parsed once to validate it and never
/// re-serialised.
pub fn annotate_json(payload: &[u8], field: &str, a: &Annotation) -> Option<Vec<u8>> {
    let start = skip_prefix(payload);
    let body = payload.get(start..)?;
    if body.first() != Some(&b'{') {
        return None;
    }
    let scan = scan_object(body, field, false)?;
    if scan.fields > 0 {
        return None;
    }
    let rest = payload.get(start + 1..)?;
    let empty = rest
        .iter()
        .find(|b| !b" \t\r\n".contains(b))
        .is_some_and(|b| *b == b'}');
    let ann = a.to_json(false);
    let name = json_string(field);
    let mut out = Vec::with_capacity(payload.len() + name.len() + ann.len() + 2);
    out.extend_from_slice(payload.get(..=start)?);
    out.extend_from_slice(&name);
    out.push(b':');
    out.extend_from_slice(&ann);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

/// The envelope form, for any payload: the JSON object
/// `{"<field>":{…annotation…,"envelope":1},"data":"<base64 of payload>"}`
/// (standard base64 with padding).
pub fn envelope(payload: &[u8], field: &str, a: &Annotation) -> Vec<u8> {
    let ann = a.to_json(true);
    let name = json_string(field);
    let b64_len = payload.len().div_ceil(3) * 4;
    let mut out = Vec::with_capacity(name.len() + ann.len() + b64_len + 16);
    out.push(b'{');
    out.extend_from_slice(&name);
    out.push(b':');
    out.extend_from_slice(&ann);
    out.extend_from_slice(b",\"data\":\"");
    let mut text = String::with_capacity(b64_len);
    BASE64.encode_string(payload, &mut text);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

/// A record as a consumer sees it after [`decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// Not a replayed copy: the data as read.
    Original(&'a [u8]),
    /// A replayed copy: its annotation and the original payload.
    Replayed {
        /// What the copy says about its original.
        annotation: Annotation,
        /// The original payload bytes.
        payload: Vec<u8>,
    },
}

impl Decoded<'_> {
    /// The payload: the data itself, or the original payload of a replayed copy.
    pub fn payload(&self) -> &[u8] {
        match self {
            Decoded::Original(d) => d,
            Decoded::Replayed { payload, .. } => payload,
        }
    }

    /// The annotation of a replayed copy.
    pub fn annotation(&self) -> Option<&Annotation> {
        match self {
            Decoded::Original(_) => None,
            Decoded::Replayed { annotation, .. } => Some(annotation),
        }
    }
}

/// Tell a replayed copy from an original record.
///
/// `Replayed` when `data` is a JSON object with exactly one member named
/// `field` whose value is an [`Annotation`]: in the envelope form (the
/// annotation has `envelope`) the payload is the base64-decoded `data`
/// member; in the JSON form it is the object without that member, byte for
/// byte as it was before [`annotate_json`]. Anything else — other JSON, an
/// object without the member, a malformed annotation or envelope, invalid
/// JSON, binary data — is `Original`. Never panics.
pub fn decode<'a>(data: &'a [u8], field: &str) -> Decoded<'a> {
    decode_replayed(data, field).unwrap_or(Decoded::Original(data))
}

fn decode_replayed<'a>(data: &[u8], field: &str) -> Option<Decoded<'a>> {
    let start = skip_prefix(data);
    let body = data.get(start..)?;
    if body.first() != Some(&b'{') {
        return None;
    }
    let scan = scan_object(body, field, true)?;
    if scan.fields != 1 {
        return None;
    }
    let annotation = scan.annotation?;
    let payload = if annotation.envelope.is_some() {
        BASE64.decode(scan.data?).ok()?
    } else {
        let (from, to) = member_span(body, field)?;
        let mut p = Vec::with_capacity(data.len().saturating_sub(to - from));
        p.extend_from_slice(data.get(..start + from)?);
        p.extend_from_slice(data.get(start + to..)?);
        p
    };
    Some(Decoded::Replayed {
        annotation,
        payload,
    })
}

// ---- one validating pass over a top-level JSON object ----------------------

/// What [`scan_object`] found.
#[derive(Debug, Default)]
struct Scan {
    /// Top-level members named like the annotation field.
    fields: usize,
    /// The (last) annotation, when captured.
    annotation: Option<Annotation>,
    /// The `data` member when it is a string, when captured.
    data: Option<String>,
}

/// Parse `body` (which must be exactly one JSON object of valid UTF-8,
/// trailing whitespace allowed) without building it, counting members named
/// `field`; with `capture`, also deserialise that member as an
/// [`Annotation`] and keep a string `data` member.
fn scan_object(body: &[u8], field: &str, capture: bool) -> Option<Scan> {
    // serde_json skips ignored strings without checking their UTF-8.
    let text = std::str::from_utf8(body).ok()?;
    let mut de = serde_json::Deserializer::from_str(text);
    let scan = ObjectSeed { field, capture }.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(scan)
}

struct ObjectSeed<'f> {
    field: &'f str,
    capture: bool,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = Scan;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Scan, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = Scan;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scan, A::Error> {
        let mut scan = Scan::default();
        while let Some(key) = map.next_key_seed(KeySeed(self.field))? {
            match key {
                Key::Field => {
                    scan.fields += 1;
                    if self.capture {
                        scan.annotation = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Key::Data if self.capture => scan.data = map.next_value::<MaybeString>()?.0,
                Key::Data | Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(scan)
    }
}

/// A member name, classified without allocating when it has no escapes.
enum Key {
    Field,
    Data,
    Other,
}

struct KeySeed<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(if v == self.0 {
            Key::Field
        } else if v == "data" {
            Key::Data
        } else {
            Key::Other
        })
    }
}

/// A value kept when it is a string and skipped otherwise.
struct MaybeString(Option<String>);

impl<'de> Deserialize<'de> for MaybeString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MaybeStringVisitor)
    }
}

struct MaybeStringVisitor;

impl<'de> Visitor<'de> for MaybeStringVisitor {
    type Value = MaybeString;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MaybeString, E> {
        Ok(MaybeString(Some(v.to_owned())))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<MaybeString, E> {
        Ok(MaybeString(Some(v)))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<MaybeString, E> {
        Ok(MaybeString(None))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<MaybeString, E> {
        Ok(MaybeString(None))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<MaybeString, E> {
        Ok(MaybeString(None))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<MaybeString, E> {
        Ok(MaybeString(None))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<MaybeString, E> {
        Ok(MaybeString(None))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<MaybeString, A::Error> {
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(MaybeString(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<MaybeString, A::Error> {
        while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(MaybeString(None))
    }
}

// ---- locating a member in a validated object --------------------------------

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while s.get(i).copied().is_some_and(is_ws) {
        i += 1;
    }
    i
}

/// End (exclusive) of the string literal starting at `i`.
fn string_end(s: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match *s.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
}

/// End (exclusive) of the JSON value starting at `i`.
fn value_end(s: &[u8], i: usize) -> Option<usize> {
    match *s.get(i)? {
        b'"' => string_end(s, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match *s.get(j)? {
                    b'"' => {
                        j = string_end(s, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while s.get(j).is_some_and(|b| !is_ws(*b) && !b",}]".contains(b)) {
                j += 1;
            }
            Some(j)
        }
    }
}

/// Whether the string literal `lit` (quotes included) spells `name`.
fn key_is(lit: &[u8], name: &str) -> bool {
    match lit.get(1..lit.len().saturating_sub(1)) {
        Some(inner) if !inner.contains(&b'\\') => inner == name.as_bytes(),
        _ => serde_json::from_slice::<String>(lit).is_ok_and(|k| k == name),
    }
}

/// The byte range of the top-level member `name` of the JSON object `body`
/// (already validated), with one adjacent comma: the one after it, or for
/// the last member the one before it. Removing the range leaves valid JSON.
fn member_span(body: &[u8], name: &str) -> Option<(usize, usize)> {
    let mut i = 1;
    // Just after the previous member's value.
    let mut prev_end: Option<usize> = None;
    loop {
        i = skip_ws(body, i);
        if *body.get(i)? != b'"' {
            return None;
        }
        let key_start = i;
        let key_end = string_end(body, i)?;
        i = skip_ws(body, key_end);
        if *body.get(i)? != b':' {
            return None;
        }
        let v_start = skip_ws(body, i + 1);
        let v_end = value_end(body, v_start)?;
        i = skip_ws(body, v_end);
        let next = *body.get(i)?;
        if key_is(body.get(key_start..key_end)?, name) {
            return if next == b',' {
                Some((key_start, i + 1))
            } else if let Some(prev) = prev_end {
                // The last member of several: take the comma before it.
                let comma = body.get(prev..key_start)?.iter().position(|b| *b == b',')?;
                Some((prev + comma, v_end))
            } else {
                Some((key_start, v_end))
            };
        }
        if next != b',' {
            return None;
        }
        prev_end = Some(v_end);
        i += 1;
    }
}

// ---- the consumer rule -------------------------------------------------------

/// What [`Applier::offer`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The value was stored.
    Applied,
    /// The record is not newer than what the key holds; nothing changed.
    Stale,
}

/// Per-key state kept by the consumer rule: for each key the greatest
/// position applied so far and the current value — or, for a deleted key, a
/// *delete marker* that keeps the delete's position, so that an older copy
/// replayed later cannot bring the key back.
#[derive(Debug, Clone)]
pub struct Applier<V> {
    state: HashMap<String, (Position, Option<V>)>,
    applied: u64,
    stale: u64,
}

impl<V> Default for Applier<V> {
    fn default() -> Self {
        Applier {
            state: HashMap::new(),
            applied: 0,
            stale: 0,
        }
    }
}

impl<V> Applier<V> {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offer a record for `key` at `position` (a live record's own position,
    /// or a replayed copy's original position from its annotation).
    ///
    /// Applied when the key holds no position or `position` is greater than
    /// the held one; a `replayed` record with `force_overwrite` is applied
    /// also when it is not, replacing the value but keeping the held (greater)
    /// position. Everything else is stale.
    pub fn offer(
        &mut self,
        key: &str,
        position: Position,
        replayed: bool,
        force_overwrite: bool,
        value: V,
    ) -> Outcome {
        self.offer_entry(key, position, replayed, force_overwrite, Some(value))
    }

    /// Offer a delete of `key` at `position` (a record the application reads
    /// as a delete — a tombstone — live or replayed). The same rule as
    /// [`Applier::offer`]; when applied the value is removed and a marker
    /// with the position is kept.
    pub fn offer_delete(
        &mut self,
        key: &str,
        position: Position,
        replayed: bool,
        force_overwrite: bool,
    ) -> Outcome {
        self.offer_entry(key, position, replayed, force_overwrite, None)
    }

    fn offer_entry(
        &mut self,
        key: &str,
        position: Position,
        replayed: bool,
        force_overwrite: bool,
        value: Option<V>,
    ) -> Outcome {
        let outcome = match self.state.get_mut(key) {
            None => {
                self.state.insert(key.to_string(), (position, value));
                Outcome::Applied
            }
            Some(held) if position > held.0 => {
                *held = (position, value);
                Outcome::Applied
            }
            Some(held) if replayed && force_overwrite => {
                held.1 = value;
                Outcome::Applied
            }
            Some(_) => Outcome::Stale,
        };
        match outcome {
            Outcome::Applied => self.applied += 1,
            Outcome::Stale => self.stale += 1,
        }
        outcome
    }

    /// The current value of `key` (`None` also for a deleted key).
    pub fn get(&self, key: &str) -> Option<&V> {
        self.state.get(key).and_then(|(_, v)| v.as_ref())
    }

    /// The greatest position applied for `key` (a delete's too).
    pub fn position(&self, key: &str) -> Option<&Position> {
        self.state.get(key).map(|(p, _)| p)
    }

    /// Whether `key` holds a delete marker.
    pub fn is_deleted(&self, key: &str) -> bool {
        self.state.get(key).is_some_and(|(_, v)| v.is_none())
    }

    /// Every key that holds a value, with its position, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Position, &V)> {
        self.state
            .iter()
            .filter_map(|(k, (p, v))| v.as_ref().map(|v| (k.as_str(), p, v)))
    }

    /// Number of keys that hold a value.
    pub fn len(&self) -> usize {
        self.state.values().filter(|(_, v)| v.is_some()).count()
    }

    /// No key holds a value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records applied so far.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Records found stale so far.
    pub fn stale(&self) -> u64 {
        self.stale
    }

    /// The state: per key the held position and the value (`None`: deleted).
    pub fn into_inner(self) -> HashMap<String, (Position, Option<V>)> {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(ms: i64, depth: u32, shard: &str, seq: &str, sub: i64) -> Position {
        Position {
            arrival_ms: ms,
            lineage_depth: depth,
            shard_id: shard.into(),
            sequence_number: seq.into(),
            subsequence_number: sub,
        }
    }

    fn ann() -> Annotation {
        Annotation {
            replay_id: "r-1".into(),
            stream: "orders".into(),
            shard_id: "shardId-000000000001".into(),
            lineage_depth: 1,
            sequence_number: "49655000000000000000000000000000000000000000000000000001".into(),
            subsequence_number: 2,
            arrival: rfc3339_ms(1_795_661_941_123),
            arrival_ms: 1_795_661_941_123,
            force_overwrite: false,
            annotations: BTreeMap::new(),
            envelope: None,
        }
    }

    #[test]
    fn position_order() {
        let base = pos(1000, 0, "s-1", "100", 0);
        // Arrival time plays no part: sequence order within a shard.
        assert!(pos(5, 0, "s-1", "101", 0) > base);
        assert!(pos(9999, 0, "s-1", "99", 0) < base);
        // Lineage depth first: a child after its parent, whatever the times.
        assert!(pos(1, 1, "s-0", "1", 0) > base);
        assert!(pos(999_999, 0, "s-9", "999999", 9) < pos(1, 1, "s-0", "1", 0));
        // Then shard id, then the sequence number compared as a number.
        assert!(pos(1000, 0, "s-2", "1", 0) > base);
        assert!(pos(1000, 0, "s-1", "99", 0) < base);
        assert!(pos(1000, 0, "s-1", "1000", 0) > base);
        assert!(pos(1000, 0, "s-1", "0100", 0) == base);
        let long = "1".repeat(60); // beyond u128
        let longer = format!("{long}0");
        assert!(pos(1000, 0, "s-1", &long, 0) < pos(1000, 0, "s-1", &longer, 0));
        assert!(pos(1000, 0, "s-1", &long, 0) > pos(1000, 0, "s-1", "9", 0));
        // Then the sub-sequence number.
        assert!(pos(1000, 0, "s-1", "100", 1) > base);
        assert_eq!(base.cmp(&base.clone()), Ordering::Equal);
    }

    #[test]
    fn replay_depths_agree_with_the_consumers_and_stay_below_listed_descendants() {
        let l = |id: &str, p: Option<&str>| (id.to_string(), p.map(String::from), None);
        // a → b → c → d; a and b aged out of the stream (archived only).
        let listed = [l("c", Some("b")), l("d", Some("c"))];
        let archived = [l("a", None), l("b", Some("a"))];
        let consumer = lineage_depths(&listed);
        let replay = replay_depths(&listed, &archived);
        assert_eq!(consumer["c"], replay["c"]);
        assert_eq!(consumer["d"], replay["d"]);
        assert!(replay["b"] < replay["c"] && replay["a"] <= replay["b"]);
        // Without aged-out ancestors it is the plain lineage.
        let listed = [l("x", None), l("y", Some("x"))];
        assert_eq!(replay_depths(&listed, &[]), lineage_depths(&listed));
        // Archived shards without listed descendants keep their full depth.
        let archived = [l("p", None), l("q", Some("p")), l("r", Some("q"))];
        let d = replay_depths(&[], &archived);
        assert_eq!((d["p"], d["q"], d["r"]), (0, 1, 2));
    }

    #[test]
    fn position_key_sorts_like_positions() {
        let all = [
            pos(0, 0, "s-1", "100", 0),
            pos(0, 0, "s-1", "0100", 1),
            pos(0, 0, "s-1", "99", 7),
            pos(0, 0, "s-1", &"9".repeat(70), 0),
            pos(0, 0, "s-10", "1", 0),
            pos(0, 0, "s", "5", 0),
            pos(0, 1, "a", "1", 0),
            pos(0, 2, "a", "1", -1),
            pos(0, 300, "a", "1", i64::MAX),
        ];
        let key = |p: &Position| {
            position_key(
                p.lineage_depth,
                &p.shard_id,
                &p.sequence_number,
                p.subsequence_number,
            )
        };
        for a in &all {
            for b in &all {
                assert_eq!(a.cmp(b), key(a).cmp(&key(b)), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn lineage_split_and_merge() {
        let s = |id: &str, p: Option<&str>, a: Option<&str>| {
            (id.to_string(), p.map(String::from), a.map(String::from))
        };
        // a splits into b and c; b and c merge into d; e is unrelated; f's
        // parent aged out of the stream; g and h form a (malformed) cycle.
        let shards = vec![
            s("d", Some("b"), Some("c")),
            s("b", Some("a"), None),
            s("c", Some("a"), None),
            s("a", None, None),
            s("e", None, None),
            s("f", Some("gone"), None),
            s("g", Some("h"), None),
            s("h", Some("g"), None),
        ];
        let d = lineage_depths(&shards);
        assert_eq!(d["a"], 0);
        assert_eq!(d["b"], 1);
        assert_eq!(d["c"], 1);
        assert_eq!(d["d"], 2);
        assert_eq!(d["e"], 0);
        assert_eq!(d["f"], 1);
        assert!(d.contains_key("g") && d.contains_key("h"));
        assert!(!d.contains_key("gone"));
        // Uneven merge: the deeper parent decides.
        let d = lineage_depths(&[
            s("x", None, None),
            s("y", Some("x"), None),
            s("z", Some("y"), Some("x")),
        ]);
        assert_eq!(d["z"], 2);
    }

    #[test]
    fn annotate_json_splices_after_the_brace() {
        let a = ann();
        let body = String::from_utf8(a.to_json(false)).unwrap();
        assert!(!body.contains("envelope") && !body.contains("annotations"));
        assert!(body.contains(r#""arrival":"2026-11-26T02:59:01.123Z""#));

        let out = annotate_json(b"{}", DEFAULT_FIELD, &a).unwrap();
        assert_eq!(out, format!(r#"{{"_fluxcap":{body}}}"#).into_bytes());
        let out = annotate_json(br#"{"a":1}"#, DEFAULT_FIELD, &a).unwrap();
        assert_eq!(out, format!(r#"{{"_fluxcap":{body},"a":1}}"#).into_bytes());
        let out = annotate_json(b" \n{ \"a\" : [1, {\"b\":\"}\"}] }\n", "f", &a).unwrap();
        assert_eq!(
            out,
            format!(" \n{{\"f\":{body}, \"a\" : [1, {{\"b\":\"}}\"}}] }}\n").into_bytes()
        );
        let bom = annotate_json(b"\xEF\xBB\xBF{\"a\":1}", "f", &a).unwrap();
        assert!(bom.starts_with(b"\xEF\xBB\xBF{\"f\":{"));
        for o in [&out[..], &bom[3..]] {
            let v: serde_json::Value = serde_json::from_slice(o).unwrap();
            assert_eq!(v["f"]["replay_id"], "r-1");
            assert_eq!(v.as_object().map(|m| m.len()), Some(2));
        }
    }

    #[test]
    fn wire_format_matches_the_documentation() {
        // The examples of docs/replay-consistency.md, byte for byte.
        let mut a = Annotation {
            replay_id: "r-20261126-0259-7f3a".into(),
            stream: "orders".into(),
            shard_id: "shardId-000000000001".into(),
            lineage_depth: 0,
            sequence_number: "49656982436452148810929356498418349453016745946224197650".into(),
            subsequence_number: 0,
            arrival: rfc3339_ms(1_795_661_941_123),
            arrival_ms: 1_795_661_941_123,
            force_overwrite: false,
            annotations: [("ticket".to_string(), "OPS-42".to_string())].into(),
            envelope: None,
        };
        let json = annotate_json(
            br#"{"order_id":"o-17","status":"paid","amount":42.5}"#,
            DEFAULT_FIELD,
            &a,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"{"_fluxcap":{"replay_id":"r-20261126-0259-7f3a","stream":"orders","shard_id":"shardId-000000000001","lineage_depth":0,"sequence_number":"49656982436452148810929356498418349453016745946224197650","subsequence_number":0,"arrival":"2026-11-26T02:59:01.123Z","arrival_ms":1795661941123,"force_overwrite":false,"annotations":{"ticket":"OPS-42"}},"order_id":"o-17","status":"paid","amount":42.5}"#
        );
        a.stream = "clicks".into();
        a.shard_id = "shardId-000000000000".into();
        a.lineage_depth = 1;
        a.sequence_number = "49656982436452148810929356498418349453016745946224197651".into();
        a.subsequence_number = 3;
        a.annotations.clear();
        let env = envelope(
            &[0x08, 0x96, 0x01, 0x12, 0x02, 0x68, 0x69],
            DEFAULT_FIELD,
            &a,
        );
        assert_eq!(
            String::from_utf8(env).unwrap(),
            r#"{"_fluxcap":{"replay_id":"r-20261126-0259-7f3a","stream":"clicks","shard_id":"shardId-000000000000","lineage_depth":1,"sequence_number":"49656982436452148810929356498418349453016745946224197651","subsequence_number":3,"arrival":"2026-11-26T02:59:01.123Z","arrival_ms":1795661941123,"force_overwrite":false,"envelope":1},"data":"CJYBEgJoaQ=="}"#
        );
        // An envelope flag set by the caller never leaks into the JSON form.
        a.envelope = Some(ENVELOPE_VERSION);
        let json = annotate_json(b"{}", "f", &a).unwrap();
        assert!(!String::from_utf8(json).unwrap().contains("envelope"));
    }

    #[test]
    fn annotate_json_refuses_what_it_cannot_splice() {
        let a = ann();
        for bad in [
            &b"[1,2]"[..],
            b"\"text\"",
            b"42",
            b"",
            b"   ",
            b"{",
            b"{\"a\":1",
            b"{\"a\":1} x",
            b"{\"a\":1}{}",
            b"{\"a\":}",
            b"{\"a\":\"\xff\xfe\"}",
            b"\xff\xfe{}",
            b"\x00\x01binary",
        ] {
            assert_eq!(annotate_json(bad, "f", &a), None, "{bad:?}");
        }
        // Already annotated, also when the name is spelled with an escape.
        assert_eq!(annotate_json(br#"{"a":1,"f":{}}"#, "f", &a), None);
        assert_eq!(annotate_json(br#"{"\u0066":null}"#, "f", &a), None);
        let once = annotate_json(b"{\"a\":1}", "f", &a).unwrap();
        assert_eq!(annotate_json(&once, "f", &a), None);
        // A nested member of that name is fine.
        assert!(annotate_json(br#"{"x":{"f":1}}"#, "f", &a).is_some());
    }

    #[test]
    fn envelope_round_trip() {
        let mut a = ann();
        a.annotations.insert("ticket".into(), "OPS-42".into());
        let payload: Vec<u8> = (0..=255u8).chain([0, 0xff, b'"', b'\\']).collect();
        let wrapped = envelope(&payload, DEFAULT_FIELD, &a);
        let v: serde_json::Value = serde_json::from_slice(&wrapped).unwrap();
        assert_eq!(v["_fluxcap"]["envelope"], 1);
        assert_eq!(v["_fluxcap"]["annotations"]["ticket"], "OPS-42");
        assert_eq!(v.as_object().unwrap().len(), 2);
        match decode(&wrapped, DEFAULT_FIELD) {
            Decoded::Replayed {
                annotation,
                payload: p,
            } => {
                assert_eq!(p, payload);
                assert_eq!(annotation.envelope, Some(ENVELOPE_VERSION));
                assert_eq!(annotation.position(), a.position());
                assert_eq!(annotation.annotations, a.annotations);
            }
            other => panic!("not replayed: {other:?}"),
        }
        // Empty payload, and a JSON payload wrapped on request.
        let e = envelope(b"", "f", &a);
        assert_eq!(decode(&e, "f").payload(), b"");
        let j = envelope(b"{\"a\":1}", "f", &a);
        assert_eq!(decode(&j, "f").payload(), b"{\"a\":1}");
        // Another field name does not see it.
        assert_eq!(decode(&j, "g"), Decoded::Original(&j[..]));
    }

    #[test]
    fn json_form_round_trip_is_byte_exact() {
        let a = ann();
        for original in [
            &b"{}"[..],
            b"{ }",
            b"{\"a\":1}",
            b"  {\"a\" : 1 ,\n \"b\":[{\"f\":2}], \"data\": {\"x\":\"y\"}}\r\n",
            b"\xEF\xBB\xBF{\"k\":\"v\\\"\"}",
        ] {
            let out = annotate_json(original, "f", &a).unwrap();
            match decode(&out, "f") {
                Decoded::Replayed {
                    annotation,
                    payload,
                } => {
                    assert_eq!(payload, original, "{}", String::from_utf8_lossy(&out));
                    assert_eq!(annotation, a);
                }
                other => panic!("not replayed: {other:?}"),
            }
        }
    }

    #[test]
    fn decode_splices_the_member_anywhere() {
        let a = ann();
        let body = String::from_utf8(a.to_json(false)).unwrap();
        let cases = [
            (format!(r#"{{"a":1,"f":{body}}}"#), r#"{"a":1}"#),
            (format!(r#"{{"a":1 , "f" : {body} }}"#), r#"{"a":1  }"#),
            (format!(r#"{{"a":1,"f":{body},"b":2}}"#), r#"{"a":1,"b":2}"#),
            (
                format!(r#"{{"\u0066":{body},"b":"\"f\""}}"#),
                r#"{"b":"\"f\""}"#,
            ),
        ];
        for (input, want) in &cases {
            let d = decode(input.as_bytes(), "f");
            assert_eq!(d.payload(), want.as_bytes(), "{input}");
            assert_eq!(d.annotation(), Some(&a));
        }
    }

    #[test]
    fn decode_leaves_everything_else_alone() {
        let a = ann();
        let body = String::from_utf8(a.to_json(false)).unwrap();
        let inputs: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\x00\xff\xfe binary".to_vec(),
            b"[1,2]".to_vec(),
            b"\"f\"".to_vec(),
            b"{\"a\":1}".to_vec(),
            b"{\"f\":1}".to_vec(),
            b"{\"f\":{\"replay_id\":\"x\"}}".to_vec(),
            b"{\"x\":{\"f\":{}}}".to_vec(),
            b"{\"f\":".to_vec(),
            format!(r#"{{"f":{body}"#).into_bytes(),
            format!(r#"{{"f":{body},"f":{body}}}"#).into_bytes(),
            // An envelope without usable data.
            String::from_utf8(envelope(b"x", "f", &a))
                .unwrap()
                .replace("\"data\":\"eA==\"", "\"data\":\"***\"")
                .into_bytes(),
            String::from_utf8(envelope(b"x", "f", &a))
                .unwrap()
                .replace("\"data\":\"eA==\"", "\"data\":7")
                .into_bytes(),
        ];
        for input in &inputs {
            assert_eq!(
                decode(input, "f"),
                Decoded::Original(&input[..]),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        // Truncations of a real annotated record never panic.
        let out = annotate_json(br#"{"a":"x\"y","b":[1,{"c":null}]}"#, "f", &a).unwrap();
        for n in 0..out.len() {
            let _ = decode(&out[..n], "f");
            let _ = annotate_json(&out[..n], "f", &a);
        }
    }

    #[test]
    fn applier_rule() {
        let mut ap = Applier::new();
        let p = |n: i64| pos(0, 0, "s", &n.to_string(), 0);
        assert_eq!(ap.offer("k", p(10), false, false, "v10"), Outcome::Applied);
        assert_eq!(ap.offer("k", p(20), true, false, "v20"), Outcome::Applied);
        // Older and equal positions are stale, live or replayed.
        assert_eq!(ap.offer("k", p(15), true, false, "v15"), Outcome::Stale);
        assert_eq!(ap.offer("k", p(15), false, false, "v15"), Outcome::Stale);
        assert_eq!(ap.offer("k", p(20), true, false, "dup"), Outcome::Stale);
        // force_overwrite is ignored on live records.
        assert_eq!(ap.offer("k", p(5), false, true, "live"), Outcome::Stale);
        assert_eq!(ap.get("k"), Some(&"v20"));
        // A forced replay overwrites the value but not the held position.
        assert_eq!(ap.offer("k", p(15), true, true, "forced"), Outcome::Applied);
        assert_eq!(ap.get("k"), Some(&"forced"));
        assert_eq!(ap.position("k"), Some(&p(20)));
        // So older records still lose and newer ones still win.
        assert_eq!(ap.offer("k", p(18), false, false, "v18"), Outcome::Stale);
        assert_eq!(ap.offer("k", p(30), false, false, "v30"), Outcome::Applied);
        assert_eq!(ap.position("k"), Some(&p(30)));
        // A forced replay that is newer raises the position like any other.
        assert_eq!(ap.offer("j", p(1), true, true, "j1"), Outcome::Applied);
        assert_eq!(ap.offer("j", p(2), true, true, "j2"), Outcome::Applied);
        assert_eq!(ap.position("j"), Some(&p(2)));
        assert_eq!((ap.len(), ap.applied(), ap.stale()), (2, 6, 5));
        let mut keys: Vec<_> = ap.iter().map(|(k, _, v)| (k, *v)).collect();
        keys.sort();
        assert_eq!(keys, vec![("j", "j2"), ("k", "v30")]);
    }

    #[test]
    fn a_delete_keeps_its_position_so_older_copies_cannot_resurrect_the_key() {
        let mut ap = Applier::new();
        let p = |n: i64| pos(0, 0, "s", &n.to_string(), 0);
        assert_eq!(ap.offer("k", p(1), false, false, "v1"), Outcome::Applied);
        assert_eq!(ap.offer_delete("k", p(5), false, false), Outcome::Applied);
        assert_eq!(ap.get("k"), None);
        assert!(ap.is_deleted("k"));
        // A replayed copy of an older write is stale: the key stays deleted.
        assert_eq!(ap.offer("k", p(3), true, false, "v3"), Outcome::Stale);
        assert_eq!(ap.get("k"), None);
        assert_eq!(ap.position("k"), Some(&p(5)));
        // A replayed delete of a key that was written again later is stale.
        assert_eq!(ap.offer("j", p(9), false, false, "j9"), Outcome::Applied);
        assert_eq!(ap.offer_delete("j", p(4), true, false), Outcome::Stale);
        assert_eq!(ap.get("j"), Some(&"j9"));
        // A newer write brings a deleted key back.
        assert_eq!(ap.offer("k", p(7), false, false, "v7"), Outcome::Applied);
        assert_eq!((ap.get("k"), ap.len()), (Some(&"v7"), 2));
    }

    #[test]
    fn replay_interleaved_with_live_writes_converges() {
        // Source history of one shard up to the horizon, then live writes.
        let history = [
            ("a", 1, "a1"),
            ("b", 2, "b1"),
            ("a", 3, "a2"),
            ("b", 4, "b2"),
        ];
        let live = [("a", 7, "a3"), ("c", 8, "c1")];
        let mut ap = Applier::new();
        // The consumer had read the history and then lost nothing; the replay
        // re-sends it while live writes interleave.
        for (k, ms, v) in history {
            ap.offer(k, pos(ms, 0, "s", &ms.to_string(), 0), false, false, v);
        }
        let mut events: Vec<(&str, i64, &str, bool)> = Vec::new();
        let mut h = history.iter();
        let mut l = live.iter();
        loop {
            let (x, y) = (h.next(), l.next());
            if x.is_none() && y.is_none() {
                break;
            }
            if let Some((k, ms, v)) = y {
                events.push((k, *ms, v, false));
            }
            if let Some((k, ms, v)) = x {
                events.push((k, *ms, v, true));
            }
        }
        for (k, ms, v, replayed) in events {
            ap.offer(k, pos(ms, 0, "s", &ms.to_string(), 0), replayed, false, v);
        }
        let mut state: Vec<_> = ap.iter().map(|(k, _, v)| (k, *v)).collect();
        state.sort();
        assert_eq!(state, vec![("a", "a3"), ("b", "b2"), ("c", "c1")]);
    }
}
