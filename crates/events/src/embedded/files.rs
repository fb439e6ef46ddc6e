//! The embedded log's files (layout 4): segment files of checksummed frames, one frame per group
//! commit, and the state every frame changes (topics, partition ends, committed group offsets,
//! the marks of the sparse index), rebuilt by reading the frames at open.
//!
//! A segment file `<position>.seg` holds the frames from that global byte position on; the next
//! segment starts where the previous one ends, so a position names one byte of the log. A frame
//! is `length: u32 | crc32: u32 | body`, the body a list of entries (a topic, a record, a group's
//! committed offset, a group's deletion). Everything of one commit is one frame, so a commit is
//! on disk whole or (a torn last frame, cut off at open) not at all.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::DateTime;

use crate::log::Record;

/// A segment is closed, and the next one begun, once it holds this many bytes.
pub(super) const SEGMENT_BYTES: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };
/// Frame header: body length, CRC-32 of the body.
pub(super) const HEADER: usize = 8;
/// A longer frame is taken for garbage (a frame is one group commit of at most
/// [`super::JOBS_PER_COMMIT`] bounded jobs).
const MAX_FRAME: usize = 1 << 30;
/// A partition's offsets that are multiples of this are marked: a read from an offset starts at
/// the frame of the mark at or before it.
pub(super) const MARK_EVERY: i64 = 64;
/// ... and so is a record this many bytes or more after its partition's last mark, which bounds
/// every scan that starts at a mark, however rarely the partition is written.
pub(super) const MARK_GAP: u64 = 4 << 20;
/// Bytes read from a file at once when scanning.
const CHUNK: usize = 256 << 10;

/// A topic partition by topic id.
pub(super) type Tp = (u32, i32);
/// The sparse index: (offset, frame) of every partition's marks, in offset order.
pub(super) type Marks = HashMap<Tp, Vec<(i64, u64)>>;

/// One entry of a frame.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Entry<'a> {
    Topic { id: u32, partitions: i32, name: &'a str },
    Record { topic: u32, partition: i32, offset: i64, ts_ms: i64, key: Option<&'a [u8]>, payload: &'a [u8] },
    Commit { group: &'a str, topic: u32, partition: i32, next: i64 },
    DeleteGroup { group: &'a str },
    /// Changes nothing: written to find out whether writes go through again, with `pad` zero
    /// bytes (as large as the write that failed: a few bytes fit in a file's last block when a
    /// frame does not).
    Probe { at_ms: i64, pad: u32 },
    /// Checkpoint entries (in `checkpoint`, never in a segment): the position the checkpoint
    /// was taken at, a partition's end and last mark, a mark of the sparse index.
    Position { at: u64 },
    End { topic: u32, partition: i32, end: i64, last_mark: Option<u64> },
    Mark { topic: u32, partition: i32, offset: i64, frame: u64 },
}

const TOPIC: u8 = 1;
const RECORD: u8 = 2;
const COMMIT: u8 = 3;
const DELETE_GROUP: u8 = 4;
const PROBE: u8 = 5;
const POSITION: u8 = 6;
const END: u8 = 7;
const MARK: u8 = 8;
/// Marks a key that is absent.
const NO_KEY: u32 = u32::MAX;

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

/// Appends an entry to a frame being built.
pub(super) fn put_entry(buf: &mut Vec<u8>, e: &Entry<'_>) {
    match e {
        Entry::Topic { id, partitions, name } => {
            buf.push(TOPIC);
            buf.extend_from_slice(&id.to_le_bytes());
            buf.extend_from_slice(&partitions.to_le_bytes());
            put_bytes(buf, name.as_bytes());
        }
        Entry::Record { topic, partition, offset, ts_ms, key, payload } => {
            buf.push(RECORD);
            buf.extend_from_slice(&topic.to_le_bytes());
            buf.extend_from_slice(&partition.to_le_bytes());
            buf.extend_from_slice(&offset.to_le_bytes());
            buf.extend_from_slice(&ts_ms.to_le_bytes());
            match key {
                Some(k) => put_bytes(buf, k),
                None => buf.extend_from_slice(&NO_KEY.to_le_bytes()),
            }
            put_bytes(buf, payload);
        }
        Entry::Commit { group, topic, partition, next } => {
            buf.push(COMMIT);
            put_bytes(buf, group.as_bytes());
            buf.extend_from_slice(&topic.to_le_bytes());
            buf.extend_from_slice(&partition.to_le_bytes());
            buf.extend_from_slice(&next.to_le_bytes());
        }
        Entry::DeleteGroup { group } => {
            buf.push(DELETE_GROUP);
            put_bytes(buf, group.as_bytes());
        }
        Entry::Probe { at_ms, pad } => {
            buf.push(PROBE);
            buf.extend_from_slice(&at_ms.to_le_bytes());
            buf.extend_from_slice(&pad.to_le_bytes());
            // Bytes that do not compress (xorshift), so the frame is as large as asked.
            let mut x = (*at_ms as u64) | 1;
            for _ in 0..*pad {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
        }
        Entry::Position { at } => {
            buf.push(POSITION);
            buf.extend_from_slice(&at.to_le_bytes());
        }
        Entry::End { topic, partition, end, last_mark } => {
            buf.push(END);
            buf.extend_from_slice(&topic.to_le_bytes());
            buf.extend_from_slice(&partition.to_le_bytes());
            buf.extend_from_slice(&end.to_le_bytes());
            buf.extend_from_slice(&last_mark.unwrap_or(u64::MAX).to_le_bytes());
        }
        Entry::Mark { topic, partition, offset, frame } => {
            buf.push(MARK);
            buf.extend_from_slice(&topic.to_le_bytes());
            buf.extend_from_slice(&partition.to_le_bytes());
            buf.extend_from_slice(&offset.to_le_bytes());
            buf.extend_from_slice(&frame.to_le_bytes());
        }
    }
}

/// Starts a frame in `buf` (cleared): room for its header, and the body's format byte.
pub(super) fn begin_frame(buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&[0; HEADER]);
    buf.push(RAW);
}

/// Body formats: the entries as they are, or LZ4-compressed (a block, after the entries'
/// length as a u32). JSON events compress 2–3× in frames of a few records.
const RAW: u8 = 0;
const LZ4: u8 = 1;
/// Bodies shorter than this are stored as they are.
const COMPRESS_FROM: usize = 128;

/// Fills in the header of the frame in `buf`, compressing its entries when that makes it
/// smaller; false when it has no entry.
pub(super) fn finish_frame(buf: &mut Vec<u8>) -> bool {
    if buf.len() <= HEADER + 1 {
        return false;
    }
    let plain = buf.len() - HEADER - 1;
    if plain >= COMPRESS_FROM {
        let packed = lz4_flex::block::compress(&buf[HEADER + 1..]);
        if packed.len() + 4 < plain {
            buf.truncate(HEADER);
            buf.push(LZ4);
            buf.extend_from_slice(&(plain as u32).to_le_bytes());
            buf.extend_from_slice(&packed);
        }
    }
    let len = (buf.len() - HEADER) as u32;
    let crc = crc32fast::hash(&buf[HEADER..]);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..HEADER].copy_from_slice(&crc.to_le_bytes());
    true
}

/// The entries of a stored body (`plain` holds them when they were compressed).
pub(super) fn body_entries<'a>(stored: &'a [u8], plain: &'a mut Vec<u8>) -> Result<&'a [u8], String> {
    match stored.first() {
        Some(&RAW) => Ok(&stored[1..]),
        Some(&LZ4) => {
            let n = stored.get(1..5).ok_or("compressed body cut short")?;
            let n = u32::from_le_bytes(n.try_into().map_err(|_| "length")?) as usize;
            if n > MAX_FRAME {
                return Err(format!("a compressed body of {n} bytes"));
            }
            plain.resize(n, 0);
            let got = lz4_flex::block::decompress_into(&stored[5..], plain).map_err(|e| format!("decompressing a frame: {e}"))?;
            if got != n {
                return Err(format!("a compressed body of {got} bytes where {n} were announced"));
            }
            Ok(&plain[..])
        }
        Some(f) => Err(format!("unknown body format {f}")),
        None => Err("an empty body".into()),
    }
}

/// The entries of a frame's body.
pub(super) struct Entries<'a> {
    b: &'a [u8],
}

pub(super) fn entries(body: &[u8]) -> Entries<'_> {
    Entries { b: body }
}

impl<'a> Entries<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err("entry cut short".into());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "u32")?))
    }
    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "i32")?))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "i64")?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|e| e.to_string())
    }
    fn entry(&mut self) -> Result<Entry<'a>, String> {
        let tag = self.take(1)?[0];
        Ok(match tag {
            TOPIC => Entry::Topic { id: self.u32()?, partitions: self.i32()?, name: self.str()? },
            RECORD => {
                let (topic, partition, offset, ts_ms) = (self.u32()?, self.i32()?, self.i64()?, self.i64()?);
                let key = match self.u32()? {
                    NO_KEY => None,
                    n => Some(self.take(n as usize)?),
                };
                Entry::Record { topic, partition, offset, ts_ms, key, payload: self.bytes()? }
            }
            COMMIT => Entry::Commit { group: self.str()?, topic: self.u32()?, partition: self.i32()?, next: self.i64()? },
            DELETE_GROUP => Entry::DeleteGroup { group: self.str()? },
            PROBE => Entry::Probe { at_ms: self.i64()?, pad: self.bytes()?.len() as u32 },
            POSITION => Entry::Position { at: self.i64()? as u64 },
            END => {
                let (topic, partition, end, mark) = (self.u32()?, self.i32()?, self.i64()?, self.i64()? as u64);
                Entry::End { topic, partition, end, last_mark: (mark != u64::MAX).then_some(mark) }
            }
            MARK => Entry::Mark { topic: self.u32()?, partition: self.i32()?, offset: self.i64()?, frame: self.i64()? as u64 },
            t => return Err(format!("unknown entry type {t}")),
        })
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, String>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.b.is_empty() {
            return None;
        }
        let e = self.entry();
        if e.is_err() {
            self.b = &[];
        }
        Some(e)
    }
}

/// What the frames say, up to some position: the writer's state, and what a reader needs.
#[derive(Clone, Default)]
pub(super) struct State {
    /// Topic names by id.
    pub names: Vec<String>,
    /// (id, partition count) by name.
    pub topics: HashMap<String, (u32, i32)>,
    /// The next offset of every partition.
    pub ends: HashMap<Tp, i64>,
    /// Committed offsets by group.
    pub groups: HashMap<String, HashMap<Tp, i64>>,
    /// The frame of every partition's last mark.
    pub last_mark: HashMap<Tp, u64>,
    /// The position after the last frame.
    pub end: u64,
}

/// A mark of the sparse index: a partition's record at `offset` is in the frame at `pos`.
pub(super) type Mark = (Tp, i64, u64);

impl State {
    /// Applies one entry of the frame at `frame`; returns the mark it makes, if any.
    pub fn apply(&mut self, e: &Entry<'_>, frame: u64) -> Result<Option<Mark>, String> {
        match *e {
            Entry::Topic { id, partitions, name } => {
                if id as usize != self.names.len() || self.topics.contains_key(name) || partitions < 1 {
                    return Err(format!("topic {name} defined out of order"));
                }
                self.names.push(name.to_owned());
                self.topics.insert(name.to_owned(), (id, partitions));
                for p in 0..partitions {
                    self.ends.insert((id, p), 0);
                }
            }
            Entry::Record { topic, partition, offset, .. } => {
                let tp = (topic, partition);
                let end = self.ends.get_mut(&tp).ok_or_else(|| format!("record of unknown partition {topic}/{partition}"))?;
                if offset != *end {
                    return Err(format!("offset {offset} of {topic}/{partition} where {end} was next"));
                }
                *end += 1;
                let last = self.last_mark.get(&tp).copied();
                if offset % MARK_EVERY == 0 || last.is_none_or(|m| frame - m >= MARK_GAP) {
                    self.last_mark.insert(tp, frame);
                    return Ok(Some((tp, offset, frame)));
                }
            }
            Entry::Commit { group, topic, partition, next } => {
                // Never backwards: a member's late commit of an older stored offset (a closed
                // consumer's, committed in the background) must not undo an offset committed
                // with appends, or those appends would be made again.
                let at = self.groups.entry(group.to_owned()).or_default().entry((topic, partition)).or_insert(next);
                *at = (*at).max(next);
            }
            Entry::DeleteGroup { group } => {
                self.groups.remove(group);
            }
            Entry::Probe { .. } => {}
            Entry::Position { .. } | Entry::End { .. } | Entry::Mark { .. } => return Err("a checkpoint entry in a segment".into()),
        }
        Ok(None)
    }

    /// A group's committed offset of a partition (0 when it never committed).
    pub fn committed(&self, group: &str, tp: Tp) -> i64 {
        self.groups.get(group).and_then(|g| g.get(&tp)).copied().unwrap_or(0)
    }
}

/// One segment file.
#[derive(Clone)]
pub(super) struct Segment {
    pub start: u64,
    pub file: Arc<File>,
}

pub(super) fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.seg"))
}

/// The segment files of a log directory, by start position.
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "seg") {
            if let Some(start) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()) {
                out.push((start, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Makes a directory entry durable (a new or renamed file in it).
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Appends frames to the last segment, and begins the next one when it is full.
pub(super) struct Writer {
    dir: PathBuf,
    seg: Segment,
    len: u64,
    /// A failed write could not be cut off: the file's end is unknown.
    pub broken: bool,
}

impl Writer {
    /// A writer at the end of a new, empty segment starting at `start`.
    pub fn create(dir: &Path, start: u64) -> io::Result<Writer> {
        let path = segment_path(dir, start);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        if let Err(e) = sync_dir(dir) {
            // Not left behind: a later segment would not follow it, and the log would not open.
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Writer { dir: dir.to_path_buf(), seg: Segment { start, file: Arc::new(file) }, len: 0, broken: false })
    }

    /// A writer at the end (`len` bytes) of an existing segment.
    pub fn resume(dir: &Path, seg: Segment, len: u64) -> Writer {
        Writer { dir: dir.to_path_buf(), seg, len, broken: false }
    }

    /// Makes everything written to the segment durable.
    pub fn sync(&self) -> io::Result<()> {
        self.seg.file.sync_data()
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segment written to.
    pub fn segment(&self) -> Segment {
        self.seg.clone()
    }

    /// The position after the last frame.
    pub fn end(&self) -> u64 {
        self.seg.start + self.len
    }

    /// Writes the frame begun in `buf` ([`begin_frame`], [`put_entry`]), and syncs its data if
    /// `sync` (always when the segment is full: the next one begins only after it is durable).
    /// Returns the new segment when one was begun. On an error the file is cut back to where
    /// the frame began, so that the next frame goes there; if even that fails, `broken` is set
    /// and nothing more may be written.
    pub fn write_frame(&mut self, buf: &mut Vec<u8>, sync: bool) -> io::Result<Option<Segment>> {
        if self.broken {
            return Err(io::Error::other("an earlier failed write could not be cut off"));
        }
        if !finish_frame(buf) {
            return Ok(None);
        }
        let at = self.len;
        let end = at + buf.len() as u64;
        let written = self.seg.file.write_all_at(buf, at).and_then(|()| if sync || end >= SEGMENT_BYTES { self.seg.file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            // Cut back, durably: a frame whose sync failed must not come back after a power cut.
            if let Err(t) = self.seg.file.set_len(at).and_then(|()| self.seg.file.sync_all()) {
                self.broken = true;
                return Err(io::Error::other(format!("{e}; cutting the frame off failed too: {t}")));
            }
            return Err(e);
        }
        self.len = end;
        if self.len < SEGMENT_BYTES {
            return Ok(None);
        }
        // The frame is durable; if the next segment cannot be begun now (no room for a file),
        // this one grows past its size until it can.
        match Writer::create(&self.dir, self.end()) {
            Ok(next) => {
                *self = next;
                Ok(Some(self.seg.clone()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "beginning the event log's next segment failed; the current one grows until it can");
                Ok(None)
            }
        }
    }
}

/// What reading a frame found.
pub(super) enum Frame<'a> {
    /// A whole frame: its body and the position after it.
    Whole(&'a [u8], u64),
    /// Nothing more up to the limit.
    End,
    /// Bytes that are not a whole frame (a torn write, or garbage) before the limit.
    Torn(String),
}

/// Reads frames from a set of segments, through a buffer.
pub(super) struct Cursor {
    segs: Arc<Vec<Segment>>,
    buf: Vec<u8>,
    /// The segment and position of `buf[0]`.
    buf_seg: usize,
    buf_at: u64,
    /// The entries of the last compressed frame read, and its position.
    plain: Vec<u8>,
    plain_at: u64,
}

impl Cursor {
    pub fn new(segs: Arc<Vec<Segment>>) -> Self {
        Cursor { segs, buf: Vec::new(), buf_seg: usize::MAX, buf_at: 0, plain: Vec::new(), plain_at: u64::MAX }
    }

    /// Uses a newer list of segments (the writer began one).
    pub fn set_segments(&mut self, segs: Arc<Vec<Segment>>) {
        if !Arc::ptr_eq(&self.segs, &segs) {
            self.segs = segs;
            self.buf_seg = usize::MAX;
            self.plain_at = u64::MAX;
        }
    }

    /// `n` bytes at `pos` of segment `seg`, reading at most `room` bytes from there.
    fn bytes(&mut self, seg: usize, pos: u64, n: usize, room: u64) -> io::Result<&[u8]> {
        let held = self.buf_seg == seg && pos >= self.buf_at && pos + n as u64 <= self.buf_at + self.buf.len() as u64;
        if !held {
            let want = (n.max(CHUNK) as u64).min(room) as usize;
            self.buf.resize(want, 0);
            let s = &self.segs[seg];
            self.buf_seg = usize::MAX;
            s.file.read_exact_at(&mut self.buf, pos - s.start)?;
            self.buf_seg = seg;
            self.buf_at = pos;
        }
        let from = (pos - self.buf_at) as usize;
        Ok(&self.buf[from..from + n])
    }

    /// Where the frame at `pos` would end by its header, if that is within `until` and leaves
    /// bytes after it (a damaged frame followed by more).
    pub fn skip_damaged(&mut self, pos: u64, until: u64) -> Result<Option<u64>, String> {
        let Some(seg) = self.segs.iter().rposition(|s| s.start <= pos) else { return Ok(None) };
        let limit = self.segs.get(seg + 1).map_or(until, |next| next.start.min(until));
        if limit.saturating_sub(pos) < HEADER as u64 {
            return Ok(None);
        }
        let head = self.bytes(seg, pos, HEADER, limit - pos).map_err(|e| e.to_string())?;
        let len = u32::from_le_bytes(head[..4].try_into().unwrap_or_default()) as u64;
        let next = pos + HEADER as u64 + len;
        Ok((len > 0 && next < limit).then_some(next))
    }

    /// The frame at `pos`, looking no further than `until`.
    pub fn frame(&mut self, pos: u64, until: u64) -> io::Result<Frame<'_>> {
        let Some(seg) = self.segs.iter().rposition(|s| s.start <= pos) else {
            return Ok(Frame::End);
        };
        let limit = self.segs.get(seg + 1).map_or(until, |next| next.start.min(until));
        if pos >= limit {
            return Ok(Frame::End);
        }
        let room = limit - pos;
        if room < HEADER as u64 {
            return Ok(Frame::Torn(format!("{room} bytes at {pos}, less than a frame header")));
        }
        let head = self.bytes(seg, pos, HEADER, room)?;
        let len = u32::from_le_bytes(head[..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().unwrap_or_default());
        if len == 0 || len > MAX_FRAME || (HEADER + len) as u64 > room {
            return Ok(Frame::Torn(format!("a frame of {len} bytes at {pos} with {room} bytes left")));
        }
        let next = pos + (HEADER + len) as u64;
        if self.plain_at == pos {
            return Ok(Frame::Whole(&self.plain, next));
        }
        let whole = self.bytes(seg, pos, HEADER + len, room)?;
        if crc32fast::hash(&whole[HEADER..]) != crc {
            return Ok(Frame::Torn(format!("checksum mismatch in the frame at {pos}")));
        }
        if whole[HEADER] == RAW {
            let from = (pos - self.buf_at) as usize + HEADER + 1;
            return Ok(Frame::Whole(&self.buf[from..from + len - 1], next));
        }
        let stored = &self.buf[(pos - self.buf_at) as usize + HEADER..][..len];
        self.plain_at = u64::MAX;
        match body_entries(stored, &mut self.plain) {
            Ok(_) => {
                self.plain_at = pos;
                Ok(Frame::Whole(&self.plain, next))
            }
            Err(e) => Ok(Frame::Torn(format!("the frame at {pos}: {e}"))),
        }
    }
}

/// What one scan found.
pub(super) struct Scan {
    pub records: Vec<Record>,
    /// Where the next scan starts: every wanted record before it is in `records` (or was read
    /// before). A frame only partly taken (`max` reached) is read again from its start.
    pub next: u64,
    /// The scan reached `until` (not its byte budget or `max`).
    pub at_end: bool,
}

/// Reads, in append order, the records from position `after` up to `until` of the partitions
/// in `parts` from their positions on (each position moves past what is taken): up to `max`
/// records, examining up to `budget` bytes of frames.
pub(super) fn scan(cur: &mut Cursor, names: &[String], after: u64, until: u64, parts: &mut [(Tp, i64)], max: usize, budget: u64) -> Result<Scan, String> {
    let mut out = Scan { records: Vec::new(), next: after, at_end: false };
    let mut pos = after;
    loop {
        if pos >= until {
            out.at_end = true;
            break;
        }
        if pos - after >= budget {
            break;
        }
        let (body, next) = match cur.frame(pos, until).map_err(|e| format!("reading the log at {pos}: {e}"))? {
            Frame::Whole(body, next) => (body, next),
            Frame::End => {
                out.at_end = true;
                break;
            }
            Frame::Torn(why) => return Err(why),
        };
        let mut full = false;
        for e in entries(body) {
            let e = e?;
            let Entry::Record { topic, partition, offset, ts_ms, key, payload } = e else { continue };
            let Some(at) = parts.iter_mut().find(|(tp, _)| *tp == (topic, partition)).map(|(_, at)| at) else { continue };
            if offset < *at {
                continue;
            }
            if out.records.len() >= max {
                full = true;
                break;
            }
            *at = offset + 1;
            out.records.push(Record {
                topic: names.get(topic as usize).cloned().unwrap_or_default(),
                partition,
                offset,
                key: key.map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                timestamp: DateTime::from_timestamp_millis(ts_ms),
            });
        }
        if full {
            // Read this frame again next time, from its start (positions skip what was taken).
            out.next = pos;
            return Ok(out);
        }
        pos = next;
        out.next = pos;
    }
    Ok(out)
}

/// The segments of a log directory read from the start: the state at the end of the last whole
/// frame, the marks, and the segments. A torn last frame (a write cut short by a crash) is cut
/// off when `repair`, else reading stops before it; torn bytes anywhere else are an error.
pub(super) struct Opened {
    pub state: State,
    pub marks: Marks,
    pub segs: Vec<Segment>,
    /// The length of the last segment (where the next frame goes).
    pub last_len: u64,
}

pub(super) fn open_segments(dir: &Path, repair: bool) -> Result<Opened, String> {
    let listed = list_segments(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut segs = Vec::new();
    let mut lens = Vec::new();
    for (start, path) in &listed {
        let file = OpenOptions::new().read(true).write(repair).open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len();
        segs.push(Segment { start: *start, file: Arc::new(file) });
        lens.push(len);
    }
    // An empty segment (left by a failed roll) holds nothing: dropped, unless it is the last one
    // and follows the one before it (the one the writer goes on with).
    let mut i = 0;
    while i < segs.len() {
        let follows = i > 0 && segs[i - 1].start + lens[i - 1] == segs[i].start;
        if lens[i] == 0 && segs.len() > 1 && !(i + 1 == segs.len() && follows) {
            if repair {
                let _ = std::fs::remove_file(segment_path(dir, segs[i].start));
            }
            segs.remove(i);
            lens.remove(i);
            continue;
        }
        i += 1;
    }
    for (i, s) in segs.iter().enumerate().skip(1) {
        let prev = &segs[i - 1];
        if prev.start + lens[i - 1] != s.start {
            return Err(format!("segment {} does not start where segment {} ends ({} bytes)", s.start, prev.start, lens[i - 1]));
        }
    }
    let first = segs.first().map_or(0, |s| s.start);
    let total = segs.last().map_or(0, |s| s.start) + lens.last().copied().unwrap_or(0);
    let segs = Arc::new(segs);
    // From the checkpoint if there is a sound one (written only at positions already durable),
    // else from the start; a checkpoint that the frames after it contradict is not used.
    let from_checkpoint = match read_checkpoint(dir) {
        Ok(Some((state, marks))) if state.end >= first && state.end <= total => Some((state, marks)),
        Ok(Some((state, _))) => {
            tracing::warn!(at = state.end, log_end = total, "the event log's checkpoint is beyond its files; reading them from the start");
            None
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "the event log's checkpoint is unreadable; reading the files from the start");
            None
        }
    };
    let read = match from_checkpoint {
        Some((state, marks)) => match read_frames(&segs, state, marks, total, repair) {
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::warn!(error = %e, "the event log's frames after its checkpoint do not follow it; reading the files from the start");
                read_frames(&segs, State { end: first, ..State::default() }, HashMap::new(), total, repair)
            }
        },
        None => read_frames(&segs, State { end: first, ..State::default() }, HashMap::new(), total, repair),
    };
    let (state, marks, cut) = read?;
    let mut last_len = lens.last().copied().unwrap_or(0);
    if let Some(at) = cut {
        last_len = at - segs.last().map_or(0, |s| s.start);
    }
    let segs = Arc::try_unwrap(segs).unwrap_or_else(|a| (*a).clone());
    Ok(Opened { state, marks, segs, last_len })
}

/// Reads the frames from `state.end` to `total`, applying them. Returns the state at the end of
/// the last whole frame, the marks, and where the last segment was cut (a torn last frame).
type Read = (State, Marks, Option<u64>);

fn read_frames(segs: &Arc<Vec<Segment>>, mut state: State, mut marks: Marks, total: u64, repair: bool) -> Result<Read, String> {
    let mut cur = Cursor::new(segs.clone());
    let mut pos = state.end;
    let mut cut = None;
    loop {
        match cur.frame(pos, total).map_err(|e| format!("reading the log at {pos}: {e}"))? {
            Frame::Whole(body, next) => {
                for e in entries(body) {
                    let e = e.map_err(|e| format!("frame at {pos}: {e}"))?;
                    if let Some((tp, offset, at)) = state.apply(&e, pos).map_err(|e| format!("frame at {pos}: {e}"))? {
                        marks.entry(tp).or_default().push((offset, at));
                    }
                }
                pos = next;
            }
            Frame::End => break,
            Frame::Torn(why) => {
                let last = segs.last().map_or(0, |s| s.start);
                if pos < last {
                    return Err(format!("the log is damaged before its last segment: {why}"));
                }
                // A torn write is the file's last bytes: a whole frame after a damaged one means
                // damage, and cutting there would drop acknowledged frames.
                if let Some(next) = cur.skip_damaged(pos, total)? {
                    if matches!(cur.frame(next, total).map_err(|e| e.to_string())?, Frame::Whole(..)) {
                        return Err(format!("the log is damaged at {pos} in its last segment ({why}), with whole frames after it"));
                    }
                }
                if repair {
                    let s = segs.last().ok_or("no segment")?;
                    tracing::warn!(at = pos, dropped = total - pos, reason = %why, "the event log's last write was cut short (a crash during a commit that was never acknowledged); dropping it");
                    s.file.set_len(pos - s.start).map_err(|e| format!("truncating the log: {e}"))?;
                    s.file.sync_all().map_err(|e| format!("truncating the log: {e}"))?;
                    cut = Some(pos);
                }
                break;
            }
        }
    }
    state.end = pos;
    Ok((state, marks, cut))
}

const CHECKPOINT: &str = "checkpoint";

/// Writes the state and the marks as of `state.end` (every frame before it durable) to
/// `checkpoint` (a new file, synced, then renamed over the old one), so that the next open
/// reads only the frames after it.
pub(super) fn write_checkpoint(dir: &Path, state: &State, marks: &Marks) -> io::Result<()> {
    let mut buf = Vec::new();
    begin_frame(&mut buf);
    put_entry(&mut buf, &Entry::Position { at: state.end });
    for (id, name) in state.names.iter().enumerate() {
        let partitions = state.topics.get(name).map_or(0, |(_, n)| *n);
        put_entry(&mut buf, &Entry::Topic { id: id as u32, partitions, name });
    }
    for ((topic, partition), end) in &state.ends {
        let last_mark = state.last_mark.get(&(*topic, *partition)).copied();
        put_entry(&mut buf, &Entry::End { topic: *topic, partition: *partition, end: *end, last_mark });
    }
    for (group, offsets) in &state.groups {
        for ((topic, partition), next) in offsets {
            put_entry(&mut buf, &Entry::Commit { group, topic: *topic, partition: *partition, next: *next });
        }
    }
    for ((topic, partition), list) in marks {
        for (offset, frame) in list {
            put_entry(&mut buf, &Entry::Mark { topic: *topic, partition: *partition, offset: *offset, frame: *frame });
        }
    }
    finish_frame(&mut buf);
    let tmp = dir.join("checkpoint.tmp");
    let f = File::create(&tmp)?;
    f.write_all_at(&buf, 0)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT))?;
    sync_dir(dir)
}

/// The state and marks of `checkpoint`, if there is one.
pub(super) fn read_checkpoint(dir: &Path) -> Result<Option<(State, Marks)>, String> {
    let bytes = match std::fs::read(dir.join(CHECKPOINT)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if bytes.len() < HEADER {
        return Err("shorter than a frame header".into());
    }
    let len = u32::from_le_bytes(bytes[..4].try_into().unwrap_or_default()) as usize;
    let crc = u32::from_le_bytes(bytes[4..HEADER].try_into().unwrap_or_default());
    let stored = bytes.get(HEADER..HEADER + len).ok_or("cut short")?;
    if crc32fast::hash(stored) != crc {
        return Err("checksum mismatch".into());
    }
    let mut plain = Vec::new();
    let body = body_entries(stored, &mut plain)?;
    let mut state = State::default();
    let mut marks: Marks = HashMap::new();
    let mut at = None;
    for e in entries(body) {
        match e? {
            Entry::Position { at: p } => at = Some(p),
            e @ (Entry::Topic { .. } | Entry::Commit { .. }) => {
                state.apply(&e, 0)?;
            }
            Entry::End { topic, partition, end, last_mark } => {
                state.ends.insert((topic, partition), end);
                if let Some(m) = last_mark {
                    state.last_mark.insert((topic, partition), m);
                }
            }
            Entry::Mark { topic, partition, offset, frame } => marks.entry((topic, partition)).or_default().push((offset, frame)),
            e => return Err(format!("unexpected entry {e:?}")),
        }
    }
    for list in marks.values_mut() {
        list.sort_unstable();
    }
    state.end = at.ok_or("no position")?;
    Ok(Some((state, marks)))
}

/// The frame of the mark at or before `offset` of a partition: its records from `offset` on are
/// in frames from there.
pub(super) fn mark_before(marks: &Marks, tp: Tp, offset: i64) -> u64 {
    let Some(m) = marks.get(&tp) else { return 0 };
    let i = m.partition_point(|(o, _)| *o <= offset);
    if i == 0 {
        0
    } else {
        m[i - 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let all = [
            Entry::Topic { id: 0, partitions: 3, name: "t" },
            Entry::Record { topic: 0, partition: 2, offset: 0, ts_ms: 7, key: Some(b"k"), payload: &[b'p'; 300] },
            Entry::Record { topic: 0, partition: 1, offset: 0, ts_ms: 8, key: None, payload: b"" },
            Entry::Commit { group: "g", topic: 0, partition: 2, next: 1 },
            Entry::DeleteGroup { group: "g" },
            Entry::Probe { at_ms: 9, pad: 3 },
            Entry::Position { at: 1 << 40 },
            Entry::End { topic: 0, partition: 2, end: 1, last_mark: None },
            Entry::End { topic: 0, partition: 1, end: 1, last_mark: Some(77) },
            Entry::Mark { topic: 0, partition: 2, offset: 0, frame: 77 },
        ];
        let mut buf = Vec::new();
        begin_frame(&mut buf);
        for e in &all {
            put_entry(&mut buf, e);
        }
        let raw = buf[HEADER + 1..].to_vec();
        assert!(finish_frame(&mut buf));
        assert_eq!(buf[HEADER], LZ4, "the probe's pad is small, the rest compresses");
        let mut plain = Vec::new();
        let body = body_entries(&buf[HEADER..], &mut plain).unwrap();
        assert_eq!(body, &raw[..]);
        let read: Vec<Entry<'_>> = entries(body).collect::<Result<_, _>>().unwrap();
        assert_eq!(read, all);
        // A body cut short is an error, not a panic; so is a compressed body cut short.
        assert!(entries(&body[..body.len() - 1]).any(|e| e.is_err()));
        assert!(body_entries(&buf[HEADER..buf.len() - 3], &mut plain).is_err());
    }
}
