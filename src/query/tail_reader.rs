//! Reading archive files from a remote store (S3) in as few requests as
//! possible: every request is a round trip (20–80 ms from a laptop), so the
//! number of requests, not bytes or CPU, decides how long a query that
//! consults many files takes.
//!
//! * **One read per file for all metadata.** The first read of a file is its
//!   last [`TAIL_HINT`] bytes. Footer, page index and bloom filters lie at
//!   the end of every file the archiver writes (one row group per file,
//!   bloom filters after it), so that read usually holds all of them; when it
//!   does not, the footer's length and the offsets it lists size one more
//!   read (two at most). The tail is kept in a cache shared by the readers of
//!   one scan ([`TailCache`]), so DataFusion's footer, page index and bloom
//!   filter reads — and the fresh reader it opens for decoding — are served
//!   from memory.
//! * **One read for the data of a small file.** When a file's data is
//!   needed and everything before its tail is at most [`WHOLE_FILE_BELOW`],
//!   it is fetched at once (a second round trip costs more than those bytes)
//!   and serves every later read of that reader; larger files read the
//!   ranges asked for, coalesced by the store.
//! * **One read for a file whose data is most likely needed.** A small file
//!   (at most [`WHOLE_FILE_BELOW`] + [`TAIL_HINT`] bytes) is read whole by
//!   its first read when the scan will most likely decode it
//!   ([`WholeFiles`]): the scan reads record columns and nothing but the
//!   partition and file names decides which files it keeps (a time range
//!   of hours, a day), or a lookup by key opens only the files whose key
//!   summary may hold the key (`archive::key_index`). A scan whose filters
//!   statistics or bloom filters may answer without the data (a key lookup
//!   without summaries) reads tails first, and one that reads no record
//!   column (`count(*)` per hour) reads only tails. At 25–80 ms per round
//!   trip and tens of MB/s, the up to 512 KiB of a file that statistics
//!   would have ruled out cost less than the second round trip of every
//!   file they would not.
//! * **Read-ahead.** DataFusion opens the files of a partition one after
//!   another; opening a file starts the tail reads of the next
//!   [`READ_AHEAD`] files of its partition, so at most
//!   `partitions × (READ_AHEAD + 1)` tails are in flight and the round trips
//!   overlap instead of adding up.
//!
//! Nothing here decides what is pruned: DataFusion still evaluates every
//! filter on statistics, bloom filters and the rows read.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::ParquetFileReaderFactory;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::{FooterTail, ParquetMetaData, ParquetMetaDataReader};

use crate::error::Error;

/// Bytes of the first read of a file (its end).
pub const TAIL_HINT: u64 = 64 * 1024;
/// A file whose part before the tail is at most this large is read whole on
/// its first data read.
pub const WHOLE_FILE_BELOW: u64 = 512 * 1024;
/// Files of a partition whose tails are read ahead of the one being opened.
pub const READ_AHEAD: usize = 4;
/// Bytes of tails a table keeps across its scans (oldest dropped first; a
/// dropped tail only costs a read again).
const CACHE_BUDGET: usize = 64 << 20;

/// The bytes `start..` to the end of a file.
#[derive(Debug)]
pub struct Tail {
    start: u64,
    bytes: Bytes,
}

impl Tail {
    /// `range` of the file, if this holds all of it.
    fn slice(&self, range: &Range<u64>) -> Option<Bytes> {
        let end = self.start + self.bytes.len() as u64;
        if range.start < self.start || range.end > end || range.start > range.end {
            return None;
        }
        let from = usize::try_from(range.start - self.start).ok()?;
        let to = usize::try_from(range.end - self.start).ok()?;
        Some(self.bytes.slice(from..to))
    }

    /// This tail extended by `before`, the bytes just before it.
    fn extend(self, before: Bytes) -> Tail {
        let mut joined = BytesMut::with_capacity(before.len() + self.bytes.len());
        joined.extend_from_slice(&before);
        joined.extend_from_slice(&self.bytes);
        Tail {
            start: self.start - before.len() as u64,
            bytes: joined.freeze(),
        }
    }
}

/// An error shared by everyone waiting for the same tail.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct SharedError(Arc<Error>);

type TailFuture = Shared<BoxFuture<'static, Result<Arc<Tail>, SharedError>>>;

#[derive(Default)]
struct Tails {
    /// Tails read or being read, by file.
    map: HashMap<Path, TailFuture>,
    /// Read tails in the order they arrived, with their sizes.
    order: VecDeque<(Path, usize)>,
    bytes: usize,
}

/// The tails of the files of a table's scans, each read once while it is
/// kept: [`CACHE_BUDGET`] bytes, the oldest dropped first.
#[derive(Default)]
pub struct TailCache {
    inner: Mutex<Tails>,
}

impl std::fmt::Debug for TailCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.lock();
        f.debug_struct("TailCache")
            .field("files", &t.map.len())
            .field("bytes", &t.bytes)
            .finish()
    }
}

impl TailCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tails> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tail of `location` (`size` bytes), read now or shared with a read
    /// under way.
    fn get(
        self: &Arc<Self>,
        store: &Arc<dyn ObjectStore>,
        location: &Path,
        size: u64,
        whole: bool,
    ) -> TailFuture {
        let mut t = self.lock();
        if let Some(f) = t.map.get(location) {
            // A file's name fixes its contents; a different size means
            // another object now (never for archive files): read it again.
            let other = f
                .peek()
                .and_then(|r| r.as_ref().ok())
                .is_some_and(|tail| tail.start + tail.bytes.len() as u64 != size);
            if !other {
                return f.clone();
            }
        }
        let cache = Arc::clone(self);
        let store = Arc::clone(store);
        let loc = location.clone();
        let fut = async move {
            let got = read_tail(store.as_ref(), &loc, size, whole).await;
            let mut t = cache.lock();
            match got {
                Ok(tail) => {
                    let tail = Arc::new(tail);
                    t.order.push_back((loc, tail.bytes.len()));
                    t.bytes += tail.bytes.len();
                    while t.bytes > CACHE_BUDGET && t.order.len() > 1 {
                        let Some((old, n)) = t.order.pop_front() else {
                            break;
                        };
                        t.map.remove(&old);
                        t.bytes -= n;
                    }
                    Ok(tail)
                }
                Err(e) => {
                    t.map.remove(&loc);
                    Err(SharedError(Arc::new(e)))
                }
            }
        }
        .boxed()
        .shared();
        t.map.insert(location.clone(), fut.clone());
        fut
    }

    /// The tail of `location` if it has been read.
    fn ready(&self, location: &Path) -> Option<Arc<Tail>> {
        let t = self.lock();
        t.map.get(location)?.peek()?.as_ref().ok().cloned()
    }
}

/// Read the end of a file: [`TAIL_HINT`] bytes, more if the footer is
/// longer, and back to the first bloom filter or page index if that is not
/// much more than those structures. With `whole`, a file of at most
/// [`WHOLE_FILE_BELOW`] + [`TAIL_HINT`] bytes is read whole at once.
async fn read_tail(
    store: &dyn ObjectStore,
    location: &Path,
    size: u64,
    whole: bool,
) -> Result<Tail, Error> {
    let bad = |source: ParquetError| Error::Parquet {
        object: location.to_string(),
        source,
    };
    let get = |range: Range<u64>| async move {
        store
            .get_range(location, range)
            .await
            .map_err(|e| Error::store(location, e))
    };
    if size < 12 {
        return Err(bad(ParquetError::General(format!(
            "{size} bytes are too few for a Parquet file"
        ))));
    }
    let hint = if whole && size <= WHOLE_FILE_BELOW + TAIL_HINT {
        size
    } else {
        TAIL_HINT.min(size)
    };
    let start = size - hint;
    let mut tail = Tail {
        start,
        bytes: get(start..size).await?,
    };
    let n = tail.bytes.len();
    let footer = n
        .checked_sub(8)
        .and_then(|from| tail.bytes.get(from..))
        .ok_or_else(|| bad(ParquetError::General("short read of the footer".into())))?;
    let footer = FooterTail::try_from(footer).map_err(bad)?;
    if footer.is_encrypted_footer() {
        return Ok(tail);
    }
    let metadata_start = size
        .checked_sub(8 + footer.metadata_length() as u64)
        .ok_or_else(|| bad(ParquetError::General("footer longer than the file".into())))?;
    if metadata_start < tail.start {
        let before = get(metadata_start..tail.start).await?;
        tail = tail.extend(before);
    }
    let metadata = tail
        .slice(&(metadata_start..size - 8))
        .ok_or_else(|| bad(ParquetError::General("footer outside the file".into())))?;
    let metadata = ParquetMetaDataReader::decode_metadata(&metadata).map_err(bad)?;
    // Bloom filters and page indexes: where the first starts, and their sizes.
    let mut first = metadata_start;
    let mut needed = 0u64;
    for rg in metadata.row_groups() {
        for c in rg.columns() {
            for (offset, length) in [
                (c.bloom_filter_offset(), c.bloom_filter_length()),
                (c.column_index_offset(), c.column_index_length()),
                (c.offset_index_offset(), c.offset_index_length()),
            ] {
                let Some(offset) = offset.and_then(|o| u64::try_from(o).ok()) else {
                    continue;
                };
                first = first.min(offset);
                needed += length.and_then(|l| u64::try_from(l).ok()).unwrap_or(0);
            }
        }
    }
    // Only when the span holds little else (bloom filters after each row
    // group of a file with several would pull in their data).
    if first < tail.start && tail.start - first <= 2 * needed + TAIL_HINT {
        let before = get(first..tail.start).await?;
        tail = tail.extend(before);
    }
    Ok(tail)
}

/// Which files of a scan are read whole by their first read (when small).
#[derive(Debug, Clone, Default)]
pub enum WholeFiles {
    /// None: the scan reads only metadata, or may rule files out by it.
    #[default]
    None,
    /// These files (a key summary says they may hold the key looked up).
    These(HashSet<Path>),
    /// Every file: the scan decodes the data of every file it opens.
    All,
}

impl WholeFiles {
    fn contains(&self, path: &Path) -> bool {
        match self {
            WholeFiles::None => false,
            WholeFiles::These(set) => set.contains(path),
            WholeFiles::All => true,
        }
    }
}

/// Opens [`TailReader`]s for one scan, reading ahead within each partition.
#[derive(Debug)]
pub struct TailReaderFactory {
    store: Arc<dyn ObjectStore>,
    tails: Arc<TailCache>,
    /// Each partition's files in the order they are opened.
    groups: Vec<Vec<(Path, u64)>>,
    /// A file's partition and place in it.
    place: HashMap<Path, (usize, usize)>,
    /// Files whose data is most likely needed: small ones are read whole
    /// by their first read.
    whole: WholeFiles,
}

impl TailReaderFactory {
    /// A factory for a scan of `groups` (each partition's files, in order)
    /// on `store`; the data of the files in `whole` is most likely needed;
    /// tails are kept in `tails` (shared with the table's other scans).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        groups: Vec<Vec<(Path, u64)>>,
        whole: WholeFiles,
        tails: Arc<TailCache>,
    ) -> Self {
        let mut place = HashMap::new();
        for (g, files) in groups.iter().enumerate() {
            for (i, (path, _)) in files.iter().enumerate() {
                place.entry(path.clone()).or_insert((g, i));
            }
        }
        TailReaderFactory {
            store,
            tails,
            groups,
            place,
            whole,
        }
    }

    /// Start reading the tails of `location` and the next files of its partition.
    fn read_ahead(&self, location: &Path) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(&(g, i)) = self.place.get(location) else {
            return;
        };
        let Some(files) = self.groups.get(g) else {
            return;
        };
        for (path, size) in files.iter().skip(i).take(READ_AHEAD + 1) {
            let tail = self
                .tails
                .get(&self.store, path, *size, self.whole.contains(path));
            if tail.peek().is_none() {
                runtime.spawn(async move {
                    // Errors reach the reader that waits for this tail.
                    let _ = tail.await;
                });
            }
        }
    }
}

impl ParquetFileReaderFactory for TailReaderFactory {
    fn create_reader(
        &self,
        _partition_index: usize,
        file: PartitionedFile,
        _metadata_size_hint: Option<usize>,
        _metrics: &ExecutionPlanMetricsSet,
    ) -> datafusion::error::Result<Box<dyn AsyncFileReader + Send>> {
        let location = file.object_meta.location.clone();
        self.read_ahead(&location);
        Ok(Box::new(TailReader {
            store: Arc::clone(&self.store),
            tails: Arc::clone(&self.tails),
            whole: self.whole.contains(&location),
            location,
            size: file.object_meta.size,
            rest: None,
        }))
    }
}

/// An [`AsyncFileReader`] that serves reads from the file's cached tail
/// and, for small files, from one read of the rest.
pub struct TailReader {
    store: Arc<dyn ObjectStore>,
    tails: Arc<TailCache>,
    location: Path,
    size: u64,
    /// Read the file whole if it is small (see [`TailReaderFactory::new`]).
    whole: bool,
    /// The part before the tail, once read.
    rest: Option<Tail>,
}

fn external(e: impl std::error::Error + Send + Sync + 'static) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl TailReader {
    async fn read(&mut self, ranges: Vec<Range<u64>>) -> parquet::errors::Result<Vec<Bytes>> {
        let tail = self.tails.ready(&self.location);
        let cached = |r: &Range<u64>, rest: &Option<Tail>| {
            tail.as_ref()
                .and_then(|t| t.slice(r))
                .or_else(|| rest.as_ref().and_then(|t| t.slice(r)))
        };
        let mut out: Vec<Option<Bytes>> = ranges.iter().map(|r| cached(r, &self.rest)).collect();
        let missing: Vec<usize> = (0..ranges.len()).filter(|&i| out[i].is_none()).collect();
        if missing.is_empty() {
            return out
                .into_iter()
                .map(|b| b.ok_or_else(|| ParquetError::General("range not read".into())))
                .collect();
        }
        let tail_start = tail.as_ref().map_or(self.size, |t| t.start);
        // The magic number "PAR1" opens every file; data starts after it.
        let whole = self.rest.is_none()
            && tail_start.saturating_sub(4) <= WHOLE_FILE_BELOW
            && missing
                .iter()
                .all(|&i| ranges[i].start >= 4 && ranges[i].end <= tail_start);
        if whole {
            let bytes = self
                .store
                .get_range(&self.location, 4..tail_start)
                .await
                .map_err(|e| external(Error::store(&self.location, e)))?;
            self.rest = Some(Tail { start: 4, bytes });
            for &i in &missing {
                out[i] = cached(&ranges[i], &self.rest);
            }
        } else {
            let wanted: Vec<Range<u64>> = missing.iter().map(|&i| ranges[i].clone()).collect();
            let got = self
                .store
                .get_ranges(&self.location, &wanted)
                .await
                .map_err(|e| external(Error::store(&self.location, e)))?;
            for (&i, b) in missing.iter().zip(got) {
                out[i] = Some(b);
            }
        }
        out.into_iter()
            .map(|b| b.ok_or_else(|| ParquetError::General("range not read".into())))
            .collect()
    }
}

impl AsyncFileReader for TailReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            self.read(vec![range])
                .await?
                .pop()
                .ok_or_else(|| ParquetError::General("range not read".into()))
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        self.read(ranges).boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let tail = self
                .tails
                .get(&self.store, &self.location, self.size, self.whole)
                .await
                .map_err(external)?;
            let mut reader = ParquetMetaDataReader::new().with_prefetch_hint(Some(
                usize::try_from(self.size - tail.start).unwrap_or(usize::MAX),
            ));
            if let Some(o) = options {
                reader = reader
                    .with_column_index_policy(o.column_index_policy())
                    .with_offset_index_policy(o.offset_index_policy())
                    .with_metadata_options(Some(o.metadata_options().clone()));
            }
            let size = self.size;
            let metadata = reader.load_and_finish(&mut *self, size).await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_serves_only_ranges_it_holds() {
        let t = Tail {
            start: 10,
            bytes: Bytes::from_static(b"abcdef"),
        };
        assert_eq!(t.slice(&(10..12)).as_deref(), Some(&b"ab"[..]));
        assert_eq!(t.slice(&(14..16)).as_deref(), Some(&b"ef"[..]));
        assert!(t.slice(&(9..12)).is_none());
        assert!(t.slice(&(14..17)).is_none());
        let t = t.extend(Bytes::from_static(b"xy"));
        assert_eq!(t.start, 8);
        assert_eq!(t.slice(&(8..11)).as_deref(), Some(&b"xya"[..]));
    }
}
