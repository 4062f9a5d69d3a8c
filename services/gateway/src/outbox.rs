//! The durable local outbox of usage events (ADR 005).
//!
//! When JetStream cannot take usage events, the publisher appends them here and replays them, in
//! order, once NATS answers again. Only the publisher task touches the outbox: the request path never
//! does disk I/O.
//!
//! Layout: a directory of append-only segment files `<seq>.seg` (`seq` zero-padded, increasing). A
//! segment is a sequence of records `[len: u32 LE][crc32(payload): u32 LE][payload]`, the payload being
//! a protobuf `UsageEvent`. Each append writes a whole batch and fsyncs it. The newest segment takes
//! appends until it reaches the segment size; a segment is deleted only after every one of its events
//! was acknowledged by JetStream. After a crash a torn or corrupt record ends its segment: it and what
//! follows it are dropped with a warning, the records before it replay. Segments found at start are
//! never appended to again (a torn tail would hide later records).
//!
//! The directory is created on the first append and locked (advisory lock on the directory itself) so
//! two gateways cannot share it; a clean shutdown with nothing left removes it.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use prost::Message as _;
use switchboard_bus::UsageEvent;

/// Bytes of a record's header (length and checksum).
const HEADER: usize = 8;
/// Largest record accepted when reading (a larger length is corruption).
const MAX_RECORD: usize = 16 * 1024 * 1024;
/// Largest segment (smaller when the outbox bound is small).
const MAX_SEGMENT: u64 = 8 * 1024 * 1024;
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Outbox errors (I/O on the outbox directory).
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A file operation failed.
    #[error("usage outbox {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Another process holds the outbox directory.
    #[error(
        "usage outbox {path} is in use by another process (give each gateway its own gateway.outbox_dir)"
    )]
    Locked { path: PathBuf },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    len: u64,
}

/// One segment read back for replay.
#[derive(Debug)]
pub struct SegmentEvents {
    /// Segment number, for [`Outbox::remove`].
    pub seq: u64,
    /// Its events, in append order.
    pub events: Vec<UsageEvent>,
}

/// The outbox. See the module documentation.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// Segments, oldest first.
    segments: VecDeque<Segment>,
    /// Open for appends on the newest segment (never one found at start).
    writer: Option<File>,
    bytes: u64,
    /// The directory, opened and locked (`None` until it exists).
    lock: Option<File>,
}

/// Takes the advisory lock of `dir` (held as long as the returned file is open).
fn lock_dir(dir: &Path) -> Result<File, OutboxError> {
    let file = File::open(dir).map_err(io_error(dir))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(OutboxError::Locked {
            path: dir.to_owned(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(OutboxError::Io {
            path: dir.to_owned(),
            source,
        }),
    }
}

impl Outbox {
    /// Opens the outbox in `dir`, bounded to `max_bytes` of records. The directory is created (and
    /// locked) on the first append; an existing one is locked now and its segments replayed.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Outbox, OutboxError> {
        let dir = dir.into();
        let mut segments = Vec::new();
        let lock = if dir.is_dir() {
            let lock = lock_dir(&dir)?;
            for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
                let entry = entry.map_err(io_error(&dir))?;
                let name = entry.file_name();
                let Some(seq) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".seg"))
                    .and_then(|n| n.parse::<u64>().ok())
                else {
                    continue;
                };
                let len = entry.metadata().map_err(io_error(&entry.path()))?.len();
                segments.push(Segment { seq, len });
            }
            Some(lock)
        } else {
            None
        };
        segments.sort_by_key(|s| s.seq);
        let bytes = segments.iter().map(|s| s.len).sum();
        if !segments.is_empty() {
            tracing::info!(
                outbox.dir = %dir.display(),
                outbox.segments = segments.len(),
                outbox.bytes = bytes,
                "usage outbox holds events from a previous run; they will be replayed"
            );
        }
        Ok(Outbox {
            dir,
            max_bytes,
            segment_bytes: (max_bytes / 4).clamp(4096, MAX_SEGMENT),
            segments: segments.into(),
            writer: None,
            bytes,
            lock,
        })
    }

    /// An outbox in `dir` that was never opened: no I/O until the first append (tests).
    #[cfg(test)]
    pub fn unopened(dir: PathBuf, max_bytes: u64) -> Outbox {
        Outbox {
            dir,
            max_bytes,
            segment_bytes: (max_bytes / 4).clamp(4096, MAX_SEGMENT),
            segments: VecDeque::new(),
            writer: None,
            bytes: 0,
            lock: None,
        }
    }

    /// Removes the directory if it holds nothing (a clean shutdown leaves no trace).
    pub fn close(self) {
        if self.segments.is_empty() && self.lock.is_some() {
            drop(self.writer);
            let _ = fs::remove_dir(&self.dir);
        }
    }

    /// Bytes on disk (records of every segment).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The configured bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Whether no event waits in the outbox.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.seg"))
    }

    /// Appends, in order, the longest prefix of `events` that fits under the bound, as one write
    /// followed by an fsync. Returns how many were appended; the others did not fit (outbox full).
    pub fn append<'a>(
        &mut self,
        events: impl IntoIterator<Item = &'a UsageEvent>,
    ) -> Result<usize, OutboxError> {
        let mut buf = Vec::new();
        let mut count = 0;
        for event in events {
            let payload = event.encode_to_vec();
            let record = (HEADER + payload.len()) as u64;
            if self.bytes + buf.len() as u64 + record > self.max_bytes || payload.len() > MAX_RECORD
            {
                break;
            }
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&CRC32.checksum(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        let rotate = match (&self.writer, self.segments.back()) {
            (Some(_), Some(last)) => last.len >= self.segment_bytes,
            _ => true,
        };
        if rotate {
            self.new_segment()?;
        }
        let Some(last) = self.segments.back_mut() else {
            return Ok(0);
        };
        let path = self.dir.join(format!("{:020}.seg", last.seq));
        let Some(writer) = self.writer.as_mut() else {
            return Ok(0);
        };
        let written = writer
            .write_all(&buf)
            .and_then(|()| writer.sync_data())
            .map_err(io_error(&path));
        match written {
            Ok(()) => {
                last.len += buf.len() as u64;
                self.bytes += buf.len() as u64;
                Ok(count)
            }
            Err(error) => {
                // What reached the file (if anything) is a torn tail: never append after it.
                self.writer = None;
                if let Ok(meta) = fs::metadata(&path) {
                    self.bytes = self.bytes - last.len + meta.len();
                    last.len = meta.len();
                }
                Err(error)
            }
        }
    }

    fn new_segment(&mut self) -> Result<(), OutboxError> {
        if self.lock.is_none() {
            fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
            if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io_error(parent))?;
            }
            self.lock = Some(lock_dir(&self.dir)?);
        }
        let seq = self.segments.back().map_or(1, |s| s.seq + 1);
        let path = self.segment_path(seq);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        // Make the new file's directory entry durable too.
        if let Some(dir) = &self.lock {
            dir.sync_all().map_err(io_error(&self.dir))?;
        }
        self.segments.push_back(Segment { seq, len: 0 });
        self.writer = Some(file);
        Ok(())
    }

    /// Reads the oldest segment for replay (sealing it first if it takes appends). A torn or corrupt
    /// record ends the segment: it and the rest are dropped with a warning.
    pub fn oldest(&mut self) -> Result<Option<SegmentEvents>, OutboxError> {
        let Some(front) = self.segments.front() else {
            return Ok(None);
        };
        let seq = front.seq;
        if self.segments.len() == 1 {
            // New events go to a new segment while this one is replayed.
            self.writer = None;
        }
        let path = self.segment_path(seq);
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(OutboxError::Io { path, source }),
        };
        let events = decode_segment(&data, &path);
        Ok(Some(SegmentEvents { seq, events }))
    }

    /// Deletes segment `seq` once all its events are acknowledged.
    pub fn remove(&mut self, seq: u64) -> Result<(), OutboxError> {
        let path = self.segment_path(seq);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(OutboxError::Io { path, source }),
        }
        if let Some(index) = self.segments.iter().position(|s| s.seq == seq) {
            if index + 1 == self.segments.len() {
                self.writer = None;
            }
            if let Some(segment) = self.segments.remove(index) {
                self.bytes = self.bytes.saturating_sub(segment.len);
            }
        }
        Ok(())
    }
}

/// Decodes a segment's records up to the first torn or corrupt one.
fn decode_segment(data: &[u8], path: &Path) -> Vec<UsageEvent> {
    let mut events = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let rest = &data[offset..];
        let problem = if rest.len() < HEADER {
            Some("torn record header")
        } else {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            if len > MAX_RECORD {
                Some("impossible record length")
            } else if rest.len() < HEADER + len {
                Some("torn record")
            } else {
                let payload = &rest[HEADER..HEADER + len];
                if CRC32.checksum(payload) != crc {
                    Some("checksum mismatch")
                } else {
                    match UsageEvent::decode(payload) {
                        Ok(event) => {
                            events.push(event);
                            offset += HEADER + len;
                            None
                        }
                        Err(_) => Some("undecodable record"),
                    }
                }
            }
        };
        if let Some(problem) = problem {
            tracing::warn!(
                outbox.segment = %path.display(),
                offset,
                dropped_bytes = data.len() - offset,
                kept_events = events.len(),
                problem,
                "usage outbox segment ends in a torn or corrupt record; dropping the tail"
            );
            break;
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> UsageEvent {
        UsageEvent {
            request_id: format!("req-{n:05}"),
            app: "app".to_owned(),
            ..Default::default()
        }
    }

    fn ids(events: &[UsageEvent]) -> Vec<String> {
        events.iter().map(|e| e.request_id.clone()).collect()
    }

    fn drain(outbox: &mut Outbox) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(segment) = outbox.oldest().unwrap() {
            out.extend(ids(&segment.events));
            outbox.remove(segment.seq).unwrap();
        }
        out
    }

    #[test]
    fn records_round_trip_in_order_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<_> = (0..500).map(event).collect();
        {
            let mut outbox = Outbox::open(dir.path(), 16 * 1024 * 1024).unwrap();
            outbox.segment_bytes = 4096; // several segments
            for chunk in events.chunks(37) {
                assert_eq!(outbox.append(chunk).unwrap(), chunk.len());
            }
            assert!(outbox.segments.len() > 1);
            assert!(outbox.bytes() > 0);
        }
        let mut outbox = Outbox::open(dir.path(), 16 * 1024 * 1024).unwrap();
        assert!(!outbox.is_empty());
        // New appends after a restart go behind the old ones.
        outbox.append(&[event(500)]).unwrap();
        let mut expected = ids(&events);
        expected.push(event(500).request_id);
        assert_eq!(drain(&mut outbox), expected);
        assert!(outbox.is_empty());
        assert_eq!(outbox.bytes(), 0);
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .collect();
        assert!(left.is_empty());
    }

    #[test]
    fn torn_tail_is_dropped_and_the_rest_replays() {
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<_> = (0..10).map(event).collect();
        {
            let mut outbox = Outbox::open(dir.path(), 1024 * 1024).unwrap();
            outbox.append(&events).unwrap();
        }
        let path = dir.path().join(format!("{:020}.seg", 1));
        let len = fs::metadata(&path).unwrap().len();
        // A crash mid-write: the last record lost its last 3 bytes.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 3).unwrap();
        drop(file);
        let mut outbox = Outbox::open(dir.path(), 1024 * 1024).unwrap();
        outbox.append(&[event(10)]).unwrap();
        let mut expected = ids(&events[..9]);
        expected.push(event(10).request_id);
        assert_eq!(drain(&mut outbox), expected);
    }

    #[test]
    fn corrupt_record_ends_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<_> = (0..5).map(event).collect();
        {
            let mut outbox = Outbox::open(dir.path(), 1024 * 1024).unwrap();
            outbox.append(&events).unwrap();
        }
        let path = dir.path().join(format!("{:020}.seg", 1));
        let mut data = fs::read(&path).unwrap();
        let record = data.len() / 5;
        data[2 * record + HEADER + 1] ^= 0xff; // third record's payload
        fs::write(&path, &data).unwrap();
        let mut outbox = Outbox::open(dir.path(), 1024 * 1024).unwrap();
        assert_eq!(drain(&mut outbox), ids(&events[..2]));
    }

    #[test]
    fn full_outbox_refuses_what_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let one = (HEADER + event(0).encode_to_vec().len()) as u64;
        let mut outbox = Outbox::open(dir.path(), one * 3 + one / 2).unwrap();
        let events: Vec<_> = (0..5).map(event).collect();
        assert_eq!(outbox.append(&events).unwrap(), 3);
        assert_eq!(outbox.append(&events[3..]).unwrap(), 0);
        assert_eq!(outbox.bytes(), one * 3);
        assert!(outbox.bytes() <= outbox.max_bytes());
        assert_eq!(drain(&mut outbox), ids(&events[..3]));
        assert_eq!(outbox.append(&events[3..]).unwrap(), 2);
    }

    #[test]
    fn a_directory_has_one_owner() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = Outbox::open(dir.path(), 1024).unwrap();
        first.append(&[event(0)]).unwrap();
        assert!(matches!(
            Outbox::open(dir.path(), 1024),
            Err(OutboxError::Locked { .. })
        ));
    }
}
