//! The sink's decoder: a v5 `PricedBatch` message straight into one ClickHouse Native block of
//! `e Tuple(<UsageEvent>), p Tuple(<UsagePrice>), priced_at Int64`, one row per price
//! (stream_processors/avro_rows.py, `NativeRows`, inserts it with the same checks in SQL as the
//! Avro fast path).
//!
//! Every value is carried as Avro wrote it (strings as bytes, longs as Int64, the decimal
//! `audio_seconds` as its big-endian bytes): ClickHouse converts and checks. This only decodes:
//! anything it does not take exactly (another writer schema's fingerprint, a v1-v4 `events`
//! array, an `index` outside its source's events, a truncated or overlong message) is `None`,
//! and the sink stores that message through its per-row path, which dead-letters what is wrong.

use crate::{MIN_ENTRY_BYTES, MIN_EVENT_BYTES, Reader};

/// Column types, in the order `encode` writes their elements; the Python side reads them back
/// as the structure of its `file(..., 'Native', ...)` source (`NATIVE_STRUCTURE`).
pub const EVENT_TYPE: &str = "Tuple(event_id String, event_time Int64, project String, \
team Nullable(String), user Nullable(String), service String, provider String, model String, \
input_tokens Int64, cached_input_tokens Int64, cache_write_tokens Int64, output_tokens Int64, \
reasoning_tokens Int64, tags Map(String, String), cache_write_1h_tokens Int64, \
input_audio_tokens Int64, output_audio_tokens Int64, audio_seconds String, characters Int64, \
images Int64, image_size String, image_quality String, requests Int64, service_tier String, \
region String, usage_source String)";
pub const PRICE_TYPE: &str = "Tuple(index Int32, cost_pico_usd Nullable(Int64), price_card String, \
pricing_status String, card_version String, itemised Map(String, Int64), unpriced_reason String, \
saved_pico_usd Int64)";

const HEADER: usize = 10; // single-object magic + fingerprint
const MAGIC: &[u8] = b"\xc3\x01";
const MIN_PRICE_BYTES: usize = 8;
const MIN_SOURCE_BYTES: usize = 3;

struct Event<'a> {
    id: &'a [u8],
    time: i64,
    project: &'a [u8],
    team: Option<&'a [u8]>,
    user: Option<&'a [u8]>,
    service: &'a [u8],
    provider: &'a [u8],
    model: &'a [u8],
    counts_a: [i64; 5], // input, cached_input, cache_write, output, reasoning
    tags: Vec<(&'a [u8], &'a [u8])>,
    counts_b: [i64; 3], // cache_write_1h, input_audio, output_audio
    audio: &'a [u8],
    characters: i64,
    images: i64,
    image_size: &'a [u8],
    image_quality: &'a [u8],
    requests: i64,
    service_tier: &'a [u8],
    region: &'a [u8],
    usage_source: &'a [u8],
}

struct Price<'a> {
    index: i32,
    cost: Option<i64>,
    card: &'a [u8],
    status: &'a [u8],
    version: &'a [u8],
    itemised: Vec<(&'a [u8], i64)>,
    reason: &'a [u8],
    saved: i64,
}

/// One output row: its event (index into the events), its price and its source's priced_at.
struct Row<'a> {
    event: usize,
    price: Price<'a>,
    priced_at: i64,
}

pub struct Fingerprints<'f> {
    pub priced_batch: &'f [u8],
    pub usage_batch: &'f [u8],
    pub usage_event: &'f [u8],
}

fn optional<'a>(r: &mut Reader<'a>) -> Option<Option<&'a [u8]>> {
    match r.long()? {
        0 => Some(None),
        1 => Some(Some(r.bytes()?)),
        _ => None,
    }
}

/// An Avro map with string keys, its values read by `value`, entries in the order written.
fn map<'a, V>(
    r: &mut Reader<'a>,
    value: impl Fn(&mut Reader<'a>) -> Option<V>,
) -> Option<Vec<(&'a [u8], V)>> {
    let mut entries = Vec::new();
    loop {
        let block = r.block_count(MIN_ENTRY_BYTES)?;
        if block == 0 {
            return Some(entries);
        }
        for _ in 0..block {
            let key = r.bytes()?;
            entries.push((key, value(r)?));
        }
    }
}

fn event<'a>(r: &mut Reader<'a>) -> Option<Event<'a>> {
    let id = r.bytes()?;
    let time = r.long()?;
    let project = r.bytes()?;
    let team = optional(r)?;
    let user = optional(r)?;
    let service = r.bytes()?;
    let provider = r.bytes()?;
    let model = r.bytes()?;
    let mut counts_a = [0i64; 5];
    for c in &mut counts_a {
        *c = r.long()?;
    }
    let tags = map(r, |r| r.bytes())?;
    let mut counts_b = [0i64; 3];
    for c in &mut counts_b {
        *c = r.long()?;
    }
    Some(Event {
        id,
        time,
        project,
        team,
        user,
        service,
        provider,
        model,
        counts_a,
        tags,
        counts_b,
        audio: r.bytes()?,
        characters: r.long()?,
        images: r.long()?,
        image_size: r.bytes()?,
        image_quality: r.bytes()?,
        requests: r.long()?,
        service_tier: r.bytes()?,
        region: r.bytes()?,
        usage_source: r.bytes()?,
    })
}

fn price<'a>(r: &mut Reader<'a>) -> Option<Price<'a>> {
    let index = i32::try_from(r.long()?).ok()?;
    let cost = match r.long()? {
        0 => None,
        1 => Some(r.long()?),
        _ => return None,
    };
    let card = r.bytes()?;
    let status = r.bytes()?;
    let version = r.bytes()?;
    let itemised = map(r, |r| r.long())?;
    Some(Price { index, cost, card, status, version, itemised, reason: r.bytes()?, saved: r.long()? })
}

/// The events of one usage.raw message written with the current UsageBatch or UsageEvent schema.
fn usage<'a>(message: &'a [u8], fp: &Fingerprints<'_>, events: &mut Vec<Event<'a>>) -> Option<usize> {
    if message.len() < HEADER || &message[..2] != MAGIC {
        return None;
    }
    let mut r = Reader { buf: &message[HEADER..], pos: 0 };
    let before = events.len();
    if &message[2..HEADER] == fp.usage_batch {
        loop {
            let block = r.block_count(MIN_EVENT_BYTES)?;
            if block == 0 {
                break;
            }
            for _ in 0..block {
                events.push(event(&mut r)?);
            }
        }
    } else if &message[2..HEADER] == fp.usage_event {
        events.push(event(&mut r)?);
    } else {
        return None;
    }
    if r.remaining() != 0 {
        return None;
    }
    Some(events.len() - before)
}

/// Appends one message's events and rows (which index `events`).
fn parse<'a>(
    value: &'a [u8],
    fp: &Fingerprints<'_>,
    events: &mut Vec<Event<'a>>,
    rows: &mut Vec<Row<'a>>,
) -> Option<()> {
    if value.len() <= HEADER || &value[..2] != MAGIC || &value[2..HEADER] != fp.priced_batch {
        return None;
    }
    let mut r = Reader { buf: &value[HEADER..], pos: 0 };
    if r.long()? != 0 {
        return None; // `events`: whole PricedUsage records (v1-v4), the per-row path's
    }
    loop {
        let block = r.block_count(MIN_SOURCE_BYTES)?;
        if block == 0 {
            break;
        }
        for _ in 0..block {
            let first = events.len();
            let n = usage(r.bytes()?, fp, events)?;
            let priced_at = r.long()?;
            loop {
                let block = r.block_count(MIN_PRICE_BYTES)?;
                if block == 0 {
                    break;
                }
                for _ in 0..block {
                    let price = price(&mut r)?;
                    let index = usize::try_from(price.index).ok().filter(|&i| i < n)?;
                    rows.push(Row { event: first + index, price, priced_at });
                }
            }
        }
    }
    if r.remaining() != 0 {
        return None;
    }
    Some(())
}

/// The rows of a message this takes; None for one it does not (see the module docstring).
pub fn rows(value: &[u8], fp: &Fingerprints<'_>) -> Option<usize> {
    let mut rows = Vec::new();
    parse(value, fp, &mut Vec::new(), &mut rows)?;
    Some(rows.len())
}

/// ClickHouse's VarUInt (LEB128).
fn var_uint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    var_uint(out, s.len() as u64);
    out.extend_from_slice(s);
}

struct Block<'r, 'a> {
    out: Vec<u8>,
    events: &'r [Event<'a>],
    rows: &'r [Row<'a>],
}

impl<'r, 'a> Block<'r, 'a> {
    fn strings(&mut self, get: impl Fn(&Event<'a>) -> &'a [u8]) {
        for row in self.rows {
            string(&mut self.out, get(&self.events[row.event]));
        }
    }

    fn longs(&mut self, get: impl Fn(&Event<'a>) -> i64) {
        for row in self.rows {
            self.out.extend_from_slice(&get(&self.events[row.event]).to_le_bytes());
        }
    }

    fn price_strings(&mut self, get: impl Fn(&Price<'a>) -> &'a [u8]) {
        for row in self.rows {
            string(&mut self.out, get(&row.price));
        }
    }

    fn nullable_strings(&mut self, get: impl Fn(&Event<'a>) -> Option<&'a [u8]>) {
        for row in self.rows {
            self.out.push(u8::from(get(&self.events[row.event]).is_none()));
        }
        self.strings(|e| get(e).unwrap_or(b""));
    }

    /// Map(String, V): the cumulative entry counts (UInt64), then every key, then every value.
    fn map<V: Copy + 'a>(
        &mut self,
        entries: impl Fn(&'r Row<'a>) -> &'r [(&'a [u8], V)],
        value: impl Fn(&mut Vec<u8>, V),
    ) {
        let mut total = 0u64;
        for row in self.rows {
            total += entries(row).len() as u64;
            self.out.extend_from_slice(&total.to_le_bytes());
        }
        for row in self.rows {
            for (k, _) in entries(row) {
                string(&mut self.out, k);
            }
        }
        for row in self.rows {
            for &(_, v) in entries(row) {
                value(&mut self.out, v);
            }
        }
    }
}

/// One Native block (header, then each column's data) of the messages' rows, in order; None if
/// one of them is not a message this takes (see the module docstring). One block for all: the
/// SQL over it runs per block, at a cost per block that small messages would pay many times.
/// No rows is no bytes at all, not a block of 0 rows: ClickHouse would read that as the end of
/// the data and skip the blocks after it.
pub fn encode(values: &[&[u8]], fp: &Fingerprints<'_>) -> Option<(Vec<u8>, usize)> {
    let (mut events, mut rows) = (Vec::new(), Vec::new());
    for value in values {
        parse(value, fp, &mut events, &mut rows)?;
    }
    if rows.is_empty() {
        return Some((Vec::new(), 0));
    }
    let size: usize = values.iter().map(|v| v.len()).sum();
    let mut b = Block { out: Vec::with_capacity(size + rows.len() * 64), events: &events, rows: &rows };
    var_uint(&mut b.out, 3);
    var_uint(&mut b.out, rows.len() as u64);

    string(&mut b.out, b"e");
    string(&mut b.out, EVENT_TYPE.as_bytes());
    b.strings(|e| e.id);
    b.longs(|e| e.time);
    b.strings(|e| e.project);
    b.nullable_strings(|e| e.team);
    b.nullable_strings(|e| e.user);
    b.strings(|e| e.service);
    b.strings(|e| e.provider);
    b.strings(|e| e.model);
    for i in 0..5 {
        b.longs(|e| e.counts_a[i]);
    }
    let events = b.events;
    b.map(|row| &events[row.event].tags, |out, v| string(out, v));
    for i in 0..3 {
        b.longs(|e| e.counts_b[i]);
    }
    b.strings(|e| e.audio);
    b.longs(|e| e.characters);
    b.longs(|e| e.images);
    b.strings(|e| e.image_size);
    b.strings(|e| e.image_quality);
    b.longs(|e| e.requests);
    b.strings(|e| e.service_tier);
    b.strings(|e| e.region);
    b.strings(|e| e.usage_source);

    string(&mut b.out, b"p");
    string(&mut b.out, PRICE_TYPE.as_bytes());
    for row in b.rows {
        b.out.extend_from_slice(&row.price.index.to_le_bytes());
    }
    for row in b.rows {
        b.out.push(u8::from(row.price.cost.is_none()));
    }
    for row in b.rows {
        b.out.extend_from_slice(&row.price.cost.unwrap_or(0).to_le_bytes());
    }
    b.price_strings(|p| p.card);
    b.price_strings(|p| p.status);
    b.price_strings(|p| p.version);
    b.map(|row| &row.price.itemised, |out, v: i64| out.extend_from_slice(&v.to_le_bytes()));
    b.price_strings(|p| p.reason);
    for row in b.rows {
        b.out.extend_from_slice(&row.price.saved.to_le_bytes());
    }

    string(&mut b.out, b"priced_at");
    string(&mut b.out, b"Int64");
    for row in b.rows {
        b.out.extend_from_slice(&row.priced_at.to_le_bytes());
    }
    Some((b.out, rows.len()))
}
