//! A controllable HTTP proxy for the S3 and Kinesis servers: it can slow
//! every request down, *hold* the next request that matches a rule until the
//! test releases it — so that a kill lands inside an upload, or a request of
//! a dead process reaches the store late, deterministically — and leave a
//! shard out of Kinesis `ListShards` answers, as AWS does once a closed shard
//! is older than the retention period — and answer PutRecords calls in part
//! (some entries throttled or refused, the rest forwarded), as a busy target
//! does — or never answer PutRecords calls that carry given partition keys,
//! as a target shard that is throttled for good does — or lose the response
//! of a request the store did apply, as a reset connection does. It also keeps every
//! forwarded request (S3 GETs of data files show what a command read), and logs
//! when each Kinesis call arrived and, for GetRecords,
//! which shard it read (following the iterators it hands out), so that a
//! test can measure the call rate per shard. SubscribeToShard event streams
//! (HTTP/1.1, chunked) are passed through as they arrive.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

/// Which request to hold: method and a part of the request line's path.
#[derive(Clone, Debug)]
struct Rule {
    method: String,
    path_part: String,
    /// A header the request must carry (lower case), if any.
    header: Option<String>,
}

/// A request the proxy holds.
struct Held {
    line: String,
    release: oneshot::Sender<()>,
    done: oneshot::Receiver<u16>,
}

#[derive(Default)]
struct Ctl {
    delay_ms: std::sync::atomic::AtomicU64,
    rule: Mutex<Option<Rule>>,
    held: Mutex<Vec<Held>>,
    hidden_shard: Mutex<Option<String>>,
    arrived: Notify,
    /// Kinesis target (e.g. `ListShards`) → (error code, how many more times).
    failing: Mutex<Vec<(String, String, u32)>>,
    /// GetRecords answers still to be replaced by an empty page.
    empty_pages: std::sync::atomic::AtomicU32,
    /// Errors injected so far.
    injected: std::sync::atomic::AtomicU64,
    /// Kinesis requests seen, per target (`GetRecords`, …).
    calls: Mutex<std::collections::HashMap<String, u64>>,
    /// PutRecords calls still to be throttled in part (every second entry).
    throttled_puts: std::sync::atomic::AtomicU32,
    /// PutRecords entries of this partition key are refused with this ErrorCode.
    refused_key: Mutex<Option<(String, String)>>,
    /// Entries refused because of `refused_key` so far.
    refused: std::sync::atomic::AtomicU64,
    /// Kinesis requests in order of arrival: target, shard (GetRecords and
    /// GetShardIterator), when.
    log: Mutex<Vec<(String, Option<String>, std::time::Instant)>>,
    /// Shard iterator handed out → its shard.
    iterators: Mutex<std::collections::HashMap<String, String>>,
    /// PutRecords calls with an entry of one of these keys are never answered.
    stalled_keys: Mutex<std::collections::HashSet<String>>,
    /// PutRecords calls stalled so far.
    stalled: std::sync::atomic::AtomicU64,
    /// Every forwarded request: its request line, its `Range` header, the
    /// bytes of the response.
    requests: Mutex<Vec<Request>>,
    /// Every SubscribeToShard request (`ShardId`, `StartingPosition`, …), in order.
    subscriptions: Mutex<Vec<serde_json::Value>>,
    /// SubscribeToShard event streams are cut after this long (0: never).
    cut_subscriptions_ms: std::sync::atomic::AtomicU64,
    /// Requests whose response is lost (forwarded, then the connection is
    /// reset): rule → how many more times.
    losing: Mutex<Vec<(Rule, u32)>>,
    /// Responses lost so far, per rule's `path_part`.
    lost: Mutex<std::collections::HashMap<String, u64>>,
}

/// A request the proxy forwarded.
#[derive(Clone, Debug)]
pub struct Request {
    /// `GET /bucket/key HTTP/1.1`.
    pub line: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Bytes of the whole response (head and body).
    pub response_bytes: usize,
}

pub struct Proxy {
    pub port: u16,
    ctl: Arc<Ctl>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Start a proxy to `127.0.0.1:upstream` on the runtime of the caller.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let ctl = Arc::new(Ctl::default());
        let c = ctl.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let _ = handle(sock, upstream, c).await;
                });
            }
        });
        Proxy { port, ctl, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every SubscribeToShard request so far (`ShardId`, `StartingPosition`, …), in order.
    pub fn subscriptions(&self) -> Vec<serde_json::Value> {
        self.ctl.subscriptions.lock().unwrap().clone()
    }

    /// Cut every SubscribeToShard event stream after `ms` (the connection
    /// closes mid-stream, as a subscription that breaks or ends early).
    pub fn cut_subscriptions_after(&self, ms: u64) {
        self.ctl
            .cut_subscriptions_ms
            .store(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Delay every request by `ms` before forwarding it.
    pub fn set_delay(&self, ms: u64) {
        self.ctl
            .delay_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Hold the next request with `method` whose path contains `path_part`.
    pub fn hold_next(&self, method: &str, path_part: &str) {
        *self.ctl.rule.lock().unwrap() = Some(Rule {
            method: method.into(),
            path_part: path_part.into(),
            header: None,
        });
    }

    /// The next `times` requests with `method` whose path contains
    /// `path_part` (and that carry `header`, e.g. `if-match`, if given) reach
    /// the upstream, which applies them, but their response is lost: the
    /// proxy resets the connection instead (a client retries a request that
    /// did land).
    pub fn lose_responses(&self, method: &str, path_part: &str, header: Option<&str>, times: u32) {
        let rule = Rule {
            method: method.into(),
            path_part: path_part.into(),
            header: header.map(str::to_ascii_lowercase),
        };
        self.ctl.losing.lock().unwrap().push((rule, times));
    }

    /// Responses lost so far by [`Proxy::lose_responses`] with `path_part`.
    pub fn lost(&self, path_part: &str) -> u64 {
        self.ctl
            .lost
            .lock()
            .unwrap()
            .get(path_part)
            .copied()
            .unwrap_or(0)
    }

    /// Wait until a request is held; returns its request line.
    pub async fn wait_held(&self, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.ctl.arrived.notified();
            if let Some(h) = self.ctl.held.lock().unwrap().first() {
                return h.line.clone();
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "no request was held within {timeout:?}"
            );
        }
    }

    /// Leave `shard` out of every `ListShards` answer from now on.
    pub fn hide_shard(&self, shard: &str) {
        *self.ctl.hidden_shard.lock().unwrap() = Some(shard.to_string());
    }

    /// Answer the next `times` Kinesis calls of `target` (e.g. `ListShards`)
    /// with the error `code` (`ProvisionedThroughputExceededException` is a
    /// 400, anything else a 500), without forwarding them.
    pub fn fail_kinesis(&self, target: &str, code: &str, times: u32) {
        self.ctl
            .failing
            .lock()
            .unwrap()
            .push((target.into(), code.into(), times));
    }

    /// Answer the next `times` GetRecords calls with an empty page that is
    /// behind the tip (as Kinesis may while records exist), whose next
    /// iterator is the one asked with.
    pub fn empty_get_records(&self, times: u32) {
        self.ctl
            .empty_pages
            .store(times, std::sync::atomic::Ordering::SeqCst);
    }

    /// Throttle the next `calls` PutRecords calls of two or more entries in
    /// part, as a busy shard does: every second entry is answered
    /// `ProvisionedThroughputExceededException`, the others are forwarded (as
    /// one PutRecords) and answered as the server answered them.
    pub fn throttle_put_records(&self, calls: u32) {
        self.ctl
            .throttled_puts
            .store(calls, std::sync::atomic::Ordering::SeqCst);
    }

    /// PutRecords calls still to be throttled in part.
    pub fn throttled_puts_left(&self) -> u32 {
        self.ctl
            .throttled_puts
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From now on, refuse every PutRecords entry with partition key `key`
    /// with the per-entry ErrorCode `code` (the others are forwarded).
    pub fn refuse_key(&self, key: &str, code: &str) {
        *self.ctl.refused_key.lock().unwrap() = Some((key.into(), code.into()));
    }

    /// From now on, never answer (nor forward) a PutRecords call that has an
    /// entry with one of `keys` as partition key: the target shard of those
    /// keys makes no progress at all while the others go on.
    pub fn stall_keys(&self, keys: impl IntoIterator<Item = String>) {
        *self.ctl.stalled_keys.lock().unwrap() = keys.into_iter().collect();
    }

    /// PutRecords calls stalled by [`Proxy::stall_keys`] so far.
    pub fn stalled(&self) -> u64 {
        self.ctl.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Entries refused by [`Proxy::refuse_key`] so far.
    pub fn refused(&self) -> u64 {
        self.ctl.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Errors injected by [`Proxy::fail_kinesis`] so far.
    pub fn injected(&self) -> u64 {
        self.ctl.injected.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Kinesis requests of `target` (e.g. `GetRecords`) seen so far.
    pub fn calls(&self, target: &str) -> u64 {
        self.ctl
            .calls
            .lock()
            .unwrap()
            .get(target)
            .copied()
            .unwrap_or(0)
    }

    /// When each Kinesis request of `target` arrived, per shard (`""` when
    /// the shard is not known), in order of arrival.
    pub fn call_times(
        &self,
        target: &str,
    ) -> std::collections::BTreeMap<String, Vec<std::time::Instant>> {
        let mut m: std::collections::BTreeMap<String, Vec<std::time::Instant>> = Default::default();
        for (t, shard, at) in self.ctl.log.lock().unwrap().iter() {
            if t == target {
                m.entry(shard.clone().unwrap_or_default())
                    .or_default()
                    .push(*at);
            }
        }
        m
    }

    /// Forget the log of [`Proxy::call_times`].
    pub fn clear_call_times(&self) {
        self.ctl.log.lock().unwrap().clear();
    }

    /// Every request forwarded so far (held ones included), in order.
    pub fn requests(&self) -> Vec<Request> {
        self.ctl.requests.lock().unwrap().clone()
    }

    /// Forget the log of [`Proxy::requests`].
    pub fn clear_requests(&self) {
        self.ctl.requests.lock().unwrap().clear();
    }

    /// Requests held now.
    pub fn held_count(&self) -> usize {
        self.ctl.held.lock().unwrap().len()
    }

    /// Let the oldest held request through; returns the upstream's status.
    pub async fn release(&self) -> u16 {
        let h = self.ctl.held.lock().unwrap().remove(0);
        let _ = h.release.send(());
        h.done.await.unwrap_or(0)
    }
}

/// Read one HTTP/1.1 request (head + Content-Length body).
pub async fn read_request(sock: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Ok(Some((head, body)))
}

/// Open a connection of its own to `127.0.0.1:upstream` and send one request
/// on it (`connection: close`); the response is left to read.
async fn send_upstream(upstream: u16, head: &str, body: &[u8]) -> std::io::Result<TcpStream> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).await?;
    let mut new_head = String::new();
    for line in head.split("\r\n") {
        if line.to_ascii_lowercase().starts_with("connection:") || line.is_empty() {
            continue;
        }
        new_head.push_str(line);
        new_head.push_str("\r\n");
    }
    new_head.push_str("connection: close\r\n\r\n");
    up.write_all(new_head.as_bytes()).await?;
    up.write_all(body).await?;
    Ok(up)
}

/// Close `sock` with a reset (RST), as a broken connection does.
pub fn reset(sock: TcpStream) {
    let _ = sock.set_zero_linger();
    drop(sock);
}

/// Send one request to `127.0.0.1:upstream` on a connection of its own; the whole response.
pub async fn forward(upstream: u16, head: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut up = send_upstream(upstream, head, body).await?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp).await?;
    Ok(resp)
}

/// Send one request to `127.0.0.1:upstream` and pass its response to `sock`
/// as it arrives (SubscribeToShard's event stream).
async fn stream_through(
    upstream: u16,
    head: &str,
    body: &[u8],
    sock: &mut TcpStream,
) -> std::io::Result<()> {
    let mut up = send_upstream(upstream, head, body).await?;
    tokio::io::copy(&mut up, sock).await?;
    sock.shutdown().await
}

fn status_of(resp: &[u8]) -> u16 {
    String::from_utf8_lossy(&resp[..resp.len().min(32)])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn handle(mut sock: TcpStream, upstream: u16, ctl: Arc<Ctl>) -> std::io::Result<()> {
    // One request per connection (the response says `connection: close`).
    let Some((head, body)) = read_request(&mut sock).await? else {
        return Ok(());
    };
    let delay = ctl.delay_ms.load(std::sync::atomic::Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let line = head.lines().next().unwrap_or_default().to_string();
    let range = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("range")
            .then(|| v.trim().to_string())
    });
    let log_request = |resp: &[u8]| {
        ctl.requests.lock().unwrap().push(Request {
            line: line.clone(),
            range: range.clone(),
            response_bytes: resp.len(),
        })
    };
    let target = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("x-amz-target")
                .then(|| v.trim().rsplit('.').next().unwrap_or_default().to_string())
        })
        .unwrap_or_default();
    let arrived = std::time::Instant::now();
    let request: serde_json::Value = if target == "GetRecords" || target == "GetShardIterator" {
        serde_json::from_slice(&body).unwrap_or_default()
    } else {
        serde_json::Value::Null
    };
    // The shard this call is about: named by GetShardIterator, known by its
    // iterator for GetRecords.
    let shard = match target.as_str() {
        "GetShardIterator" => request["ShardId"].as_str().map(str::to_string),
        "GetRecords" => request["ShardIterator"]
            .as_str()
            .and_then(|it| ctl.iterators.lock().unwrap().get(it).cloned()),
        _ => None,
    };
    if !target.is_empty() {
        *ctl.calls.lock().unwrap().entry(target.clone()).or_default() += 1;
        ctl.log
            .lock()
            .unwrap()
            .push((target.clone(), shard.clone(), arrived));
    }
    let failure = {
        let mut failing = ctl.failing.lock().unwrap();
        failing
            .iter_mut()
            .find(|(t, _, n)| *t == target && *n > 0)
            .map(|(_, code, n)| {
                *n -= 1;
                code.clone()
            })
    };
    if let Some(code) = failure {
        ctl.injected
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let status = if code == "ProvisionedThroughputExceededException" {
            "400 Bad Request"
        } else {
            "500 Internal Server Error"
        };
        let body = format!(r#"{{"__type":"{code}","message":"injected by the test proxy"}}"#);
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(resp.as_bytes()).await?;
        return Ok(());
    }
    if target == "GetRecords"
        && ctl
            .empty_pages
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok()
    {
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let it = req["ShardIterator"].as_str().unwrap_or_default();
        let body = serde_json::json!({"Records": [], "MillisBehindLatest": 60000, "NextShardIterator": it})
            .to_string();
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(resp.as_bytes()).await?;
        return Ok(());
    }
    if target == "PutRecords" && stalls(&body, &ctl) {
        ctl.stalled
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Never answered: the connection stays open until the client goes
        // away or the proxy is dropped.
        std::future::pending::<()>().await;
    }
    if target == "PutRecords"
        && let Some(resp) = put_records_in_part(upstream, &head, &body, &ctl).await?
    {
        sock.write_all(&resp).await?;
        return Ok(());
    }
    let lose = {
        let mut losing = ctl.losing.lock().unwrap();
        losing
            .iter_mut()
            .find(|(r, n)| {
                *n > 0
                    && line.starts_with(&format!("{} ", r.method))
                    && line.contains(&r.path_part)
                    && r.header.as_ref().is_none_or(|h| {
                        head.lines().any(|l| {
                            l.split_once(':')
                                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(h))
                        })
                    })
            })
            .map(|(r, n)| {
                *n -= 1;
                r.path_part.clone()
            })
    };
    if let Some(part) = lose {
        let resp = forward(upstream, &head, &body).await?;
        log_request(&resp);
        *ctl.lost.lock().unwrap().entry(part).or_default() += 1;
        reset(sock); // the client never sees the answer
        return Ok(());
    }
    let matched = {
        let mut rule = ctl.rule.lock().unwrap();
        let hit = rule.as_ref().is_some_and(|r| {
            line.starts_with(&format!("{} ", r.method)) && line.contains(&r.path_part)
        });
        if hit {
            *rule = None;
        }
        hit
    };
    if matched {
        let (release, wait_release) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        ctl.held.lock().unwrap().push(Held {
            line: line.clone(),
            release,
            done,
        });
        ctl.arrived.notify_waiters();
        if wait_release.await.is_err() {
            return Ok(());
        }
        // The client may be dead by now: the request still reaches the store.
        let resp = forward(upstream, &head, &body).await;
        if let Ok(r) = &resp {
            log_request(r);
        }
        let _ = done_tx.send(resp.as_ref().map_or(0, |r| status_of(r)));
        if let Ok(resp) = resp {
            let _ = sock.write_all(&resp).await;
        }
        return Ok(());
    }
    if target == "SubscribeToShard" {
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        ctl.subscriptions.lock().unwrap().push(req);
        // An event stream: passed through as it arrives, for as long as it lasts.
        let cut = ctl
            .cut_subscriptions_ms
            .load(std::sync::atomic::Ordering::SeqCst);
        let pass = stream_through(upstream, &head, &body, &mut sock);
        if cut == 0 {
            return pass.await;
        }
        let _ = tokio::time::timeout(Duration::from_millis(cut), pass).await;
        return Ok(());
    }
    let mut resp = forward(upstream, &head, &body).await?;
    log_request(&resp);
    if let Some(shard) = &shard {
        let v: serde_json::Value = serde_json::from_slice(&body_of(&resp)).unwrap_or_default();
        let next = match target.as_str() {
            "GetShardIterator" => v["ShardIterator"].as_str(),
            _ => v["NextShardIterator"].as_str(),
        };
        if let Some(it) = next {
            ctl.iterators
                .lock()
                .unwrap()
                .insert(it.to_string(), shard.clone());
        }
    }
    let hidden = ctl.hidden_shard.lock().unwrap().clone();
    if let Some(shard) = hidden
        && head.contains("Kinesis_20131202.ListShards")
    {
        resp = without_shard(&resp, &shard);
    }
    sock.write_all(&resp).await?;
    sock.shutdown().await?;
    Ok(())
}

/// The body of an HTTP response (de-chunked).
fn body_of(resp: &[u8]) -> Vec<u8> {
    let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Vec::new();
    };
    let head = String::from_utf8_lossy(&resp[..i]).to_ascii_lowercase();
    let raw = &resp[i + 4..];
    if head.contains("transfer-encoding: chunked") {
        dechunk(raw)
    } else {
        raw.to_vec()
    }
}

fn json_response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answer a PutRecords call in part when the test asked for it
/// ([`Proxy::throttle_put_records`], [`Proxy::refuse_key`]): the entries let
/// through are forwarded as one PutRecords, the others get an ErrorCode, and
/// the answer lists them all in request order. `None`: forward as is.
/// Whether a PutRecords body has an entry whose key is stalled.
fn stalls(body: &[u8], ctl: &Ctl) -> bool {
    let keys = ctl.stalled_keys.lock().unwrap();
    if keys.is_empty() {
        return false;
    }
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    req["Records"].as_array().is_some_and(|entries| {
        entries
            .iter()
            .any(|e| e["PartitionKey"].as_str().is_some_and(|k| keys.contains(k)))
    })
}

async fn put_records_in_part(
    upstream: u16,
    head: &str,
    body: &[u8],
    ctl: &Ctl,
) -> std::io::Result<Option<Vec<u8>>> {
    use std::sync::atomic::Ordering::SeqCst;
    let refused_key = ctl.refused_key.lock().unwrap().clone();
    if refused_key.is_none() && ctl.throttled_puts.load(SeqCst) == 0 {
        return Ok(None);
    }
    let Ok(mut req) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Ok(None);
    };
    let entries = req["Records"].as_array().cloned().unwrap_or_default();
    let throttle = entries.len() >= 2
        && ctl
            .throttled_puts
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
    // Per entry: Some(code) when refused here.
    let verdict: Vec<Option<String>> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if let Some((key, code)) = &refused_key
                && e["PartitionKey"].as_str() == Some(key.as_str())
            {
                ctl.refused.fetch_add(1, SeqCst);
                return Some(code.clone());
            }
            (throttle && i % 2 == 1).then(|| "ProvisionedThroughputExceededException".to_string())
        })
        .collect();
    if verdict.iter().all(Option::is_none) {
        return Ok(None);
    }
    if throttle {
        ctl.injected.fetch_add(1, SeqCst);
    }
    let kept: Vec<serde_json::Value> = entries
        .iter()
        .zip(&verdict)
        .filter(|(_, v)| v.is_none())
        .map(|(e, _)| e.clone())
        .collect();
    let mut written: Vec<serde_json::Value> = Vec::new();
    if !kept.is_empty() {
        req["Records"] = serde_json::Value::Array(kept);
        let new_body = serde_json::to_vec(&req).unwrap();
        let mut new_head = String::new();
        for line in head.split("\r\n") {
            if line.is_empty() || line.to_ascii_lowercase().starts_with("content-length:") {
                continue;
            }
            new_head.push_str(line);
            new_head.push_str("\r\n");
        }
        new_head.push_str(&format!("content-length: {}\r\n\r\n", new_body.len()));
        let resp = forward(upstream, &new_head, &new_body).await?;
        if status_of(&resp) != 200 {
            return Ok(Some(resp));
        }
        let v: serde_json::Value = serde_json::from_slice(&body_of(&resp)).unwrap_or_default();
        written = v["Records"].as_array().cloned().unwrap_or_default();
    }
    let mut written = written.into_iter();
    let mut failed = 0;
    let records: Vec<serde_json::Value> = verdict
        .into_iter()
        .map(|v| {
            let r = match v {
                Some(code) => serde_json::json!({"ErrorCode": code, "ErrorMessage": "injected by the test proxy"}),
                None => written.next().unwrap_or_else(
                    || serde_json::json!({"ErrorCode": "InternalFailure", "ErrorMessage": "no answer"}),
                ),
            };
            if r.get("ErrorCode").is_some_and(|c| !c.is_null()) {
                failed += 1;
            }
            r
        })
        .collect();
    let answer = serde_json::json!({"FailedRecordCount": failed, "Records": records}).to_string();
    Ok(Some(json_response("200 OK", &answer)))
}

/// A ListShards response without `shard` (the body re-encoded with a length).
fn without_shard(resp: &[u8], shard: &str) -> Vec<u8> {
    let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return resp.to_vec();
    };
    let head = String::from_utf8_lossy(&resp[..i]).to_string();
    let raw = &resp[i + 4..];
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(raw)
    } else {
        raw.to_vec()
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return resp.to_vec();
    };
    if let Some(shards) = v.get_mut("Shards").and_then(|s| s.as_array_mut()) {
        shards.retain(|s| s["ShardId"].as_str() != Some(shard));
    }
    let body = serde_json::to_vec(&v).unwrap();
    let mut out = String::new();
    for line in head.split("\r\n") {
        let l = line.to_ascii_lowercase();
        if l.starts_with("content-length:") || l.starts_with("transfer-encoding:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&raw[..i])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = i + 2;
        let end = (start + size).min(raw.len());
        out.extend_from_slice(&raw[start..end]);
        raw = &raw[(end + 2).min(raw.len())..];
    }
    out
}
