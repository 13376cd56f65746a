//! The meter's decoder: the Avro body of a spendstream `UsageBatch` straight into columns
//! (stream_processors/usage_columns.py reads them; without this module the meter decodes with
//! fastavro, ~40x the CPU, with the same results).
//!
//! Two phases: `parse` is pure Rust (no Python objects, every error is `None`), then `to_python`
//! builds the few Python objects the caller needs (one str per event_id, one str per distinct
//! text value per column, and packed little-endian buffers for the numbers).
//!
//! Field order (UsageEvent, schemas/dev.spendstream.UsageEvent.avsc):
//!  0 event_id string          1 event_time long        2 project string
//!  3 team [null,string]       4 user [null,string]     5 service string
//!  6 provider string          7 model string           8 input_tokens long
//!  9 cached_input_tokens long 10 cache_write_tokens long 11 output_tokens long
//! 12 reasoning_tokens long    13 tags map<string>      14 cache_write_1h_tokens long
//! 15 input_audio_tokens long  16 output_audio_tokens long 17 audio_seconds bytes (decimal 18,6)
//! 18 characters long          19 images long           20 image_size string
//! 21 image_quality string     22 requests long         23 service_tier string
//! 24 region string            25 usage_source string

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use rustc_hash::{FxHashMap, FxHashSet};

mod priced;

/// Smallest possible encoded UsageEvent: 26 fields of at least one byte each.
const MIN_EVENT_BYTES: usize = 26;
/// Smallest possible map entry: empty key + empty value.
const MIN_ENTRY_BYTES: usize = 2;
const KEY_TAG: &[u8] = b"spendstream.key";

/// Text columns in output order; index into `Parsed::texts`.
const TEXT_NAMES: [&str; 12] = [
    "project",
    "team",
    "user",
    "service",
    "provider",
    "model",
    "image_size",
    "image_quality",
    "service_tier",
    "region",
    "usage_source",
    "key",
];
const T_PROJECT: usize = 0;
const T_TEAM: usize = 1;
const T_USER: usize = 2;
const T_SERVICE: usize = 3;
const T_PROVIDER: usize = 4;
const T_MODEL: usize = 5;
const T_IMAGE_SIZE: usize = 6;
const T_IMAGE_QUALITY: usize = 7;
const T_SERVICE_TIER: usize = 8;
const T_REGION: usize = 9;
const T_USAGE_SOURCE: usize = 10;
const T_KEY: usize = 11;

/// Count columns in output order (row-major, 11 per event).
const N_COUNTS: usize = 11;
const C_INPUT: usize = 0;
const C_CACHED_INPUT: usize = 1;
const C_CACHE_WRITE: usize = 2;
const C_CACHE_WRITE_1H: usize = 3;
const C_OUTPUT: usize = 4;
const C_REASONING: usize = 5;
const C_INPUT_AUDIO: usize = 6;
const C_OUTPUT_AUDIO: usize = 7;
const C_CHARACTERS: usize = 8;
const C_IMAGES: usize = 9;
const C_REQUESTS: usize = 10;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Zigzag varint long. At most 10 bytes; the 10th may only carry bit 63 (value 0 or 1), so
    /// every accepted encoding maps to exactly the u64 fastavro computes for it.
    #[inline(always)]
    fn long(&mut self) -> Option<i64> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        if b & 0x80 == 0 {
            let z = b as u64;
            return Some(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
        let mut z = (b & 0x7f) as u64;
        let mut shift = 7u32;
        loop {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            if shift == 63 && b > 1 {
                return None;
            }
            z |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
            shift += 7;
        }
    }

    /// Length-prefixed bytes (Avro bytes and string).
    #[inline(always)]
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.long()?;
        if len < 0 {
            return None;
        }
        let len = usize::try_from(len).ok()?;
        let end = self.pos.checked_add(len)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    #[inline(always)]
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Next block count of an array or map: Some(0) at the end. A negative count is followed by
    /// the block's byte size, read and ignored like fastavro does. `min_item` bounds the count by
    /// the bytes left so a corrupt count cannot make us reserve memory.
    #[inline]
    fn block_count(&mut self, min_item: usize) -> Option<usize> {
        let c = self.long()?;
        let c = if c < 0 {
            let c = c.checked_neg()?;
            self.long()?; // block size in bytes, unused
            c
        } else {
            c
        };
        let c = usize::try_from(c).ok()?;
        if c > self.remaining() / min_item {
            return None;
        }
        Some(c)
    }
}

/// One dictionary-encoded text column.
struct TextCol<'a> {
    codes: Vec<u32>,
    values: Vec<Option<&'a str>>,
    map: FxHashMap<&'a [u8], u32>,
    null_code: Option<u32>,
    last: Option<(&'a [u8], u32)>,
}

impl<'a> TextCol<'a> {
    fn new(cap: usize) -> Self {
        TextCol {
            codes: Vec::with_capacity(cap),
            values: Vec::new(),
            map: FxHashMap::default(),
            null_code: None,
            last: None,
        }
    }

    #[inline(always)]
    fn push(&mut self, v: Option<&'a [u8]>) -> Option<()> {
        let code = match v {
            None => match self.null_code {
                Some(c) => c,
                None => {
                    let c = self.values.len() as u32;
                    self.values.push(None);
                    self.null_code = Some(c);
                    c
                }
            },
            Some(b) => match self.last {
                Some((lb, lc)) if lb == b => lc,
                _ => {
                    let c = match self.map.get(b) {
                        Some(&c) => c,
                        None => {
                            // Validate once per distinct value (strict UTF-8, like fastavro's
                            // bytes.decode(): surrogates and overlong forms are refused too).
                            let s = std::str::from_utf8(b).ok()?;
                            let c = self.values.len() as u32;
                            self.values.push(Some(s));
                            self.map.insert(b, c);
                            c
                        }
                    };
                    self.last = Some((b, c));
                    c
                }
            },
        };
        self.codes.push(code);
        Some(())
    }
}

struct Parsed<'a> {
    n: usize,
    event_ids: Vec<&'a str>,
    event_time: Vec<i64>,
    texts: Vec<TextCol<'a>>,
    counts: Vec<i64>,
    audio_micros: Vec<i64>,
    max_tags: usize,
    max_key_chars: usize,
    max_value_chars: usize,
}

#[inline(always)]
fn utf8(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

/// Decimal bytes as a signed big-endian integer; None if longer than 8 bytes.
#[inline(always)]
fn be_signed(b: &[u8]) -> Option<i64> {
    if b.len() > 8 {
        return None;
    }
    let mut v: u64 = match b.first() {
        Some(&first) if first & 0x80 != 0 => u64::MAX,
        _ => 0,
    };
    for &x in b {
        v = (v << 8) | x as u64;
    }
    Some(v as i64)
}

fn parse(body: &[u8]) -> Option<Parsed<'_>> {
    let mut r = Reader { buf: body, pos: 0 };
    let cap = (body.len() / 64).min(1 << 16);
    let mut p = Parsed {
        n: 0,
        event_ids: Vec::with_capacity(cap),
        event_time: Vec::with_capacity(cap),
        texts: (0..TEXT_NAMES.len()).map(|_| TextCol::new(cap)).collect(),
        counts: Vec::with_capacity(cap * N_COUNTS),
        audio_micros: Vec::with_capacity(cap),
        max_tags: 0,
        max_key_chars: 0,
        max_value_chars: 0,
    };
    // keys of the current tags map, to refuse duplicates (fastavro keeps the last one; we leave
    // that rare case to fastavro rather than emulate it)
    let mut keys: Vec<&[u8]> = Vec::new();
    let mut key_set: FxHashSet<&[u8]> = FxHashSet::default();

    loop {
        let block = r.block_count(MIN_EVENT_BYTES)?;
        if block == 0 {
            break;
        }
        for _ in 0..block {
            let mut row = [0i64; N_COUNTS];
            p.event_ids.push(utf8(r.bytes()?)?);
            p.event_time.push(r.long()?);
            let t = &mut p.texts;
            t[T_PROJECT].push(Some(r.bytes()?))?;
            for col in [T_TEAM, T_USER] {
                let v = match r.long()? {
                    0 => None,
                    1 => Some(r.bytes()?),
                    _ => return None,
                };
                t[col].push(v)?;
            }
            t[T_SERVICE].push(Some(r.bytes()?))?;
            t[T_PROVIDER].push(Some(r.bytes()?))?;
            t[T_MODEL].push(Some(r.bytes()?))?;
            row[C_INPUT] = r.long()?;
            row[C_CACHED_INPUT] = r.long()?;
            row[C_CACHE_WRITE] = r.long()?;
            row[C_OUTPUT] = r.long()?;
            row[C_REASONING] = r.long()?;

            // tags: map<string>
            keys.clear();
            key_set.clear();
            let mut key_tag: Option<&[u8]> = None;
            loop {
                let block = r.block_count(MIN_ENTRY_BYTES)?;
                if block == 0 {
                    break;
                }
                for _ in 0..block {
                    let kb = r.bytes()?;
                    let vb = r.bytes()?;
                    let k = utf8(kb)?;
                    let v = utf8(vb)?;
                    if keys.len() < 16 {
                        if keys.contains(&kb) {
                            return None;
                        }
                        keys.push(kb);
                        if keys.len() == 16 {
                            key_set.extend(keys.iter().copied());
                        }
                    } else if !key_set.insert(kb) {
                        return None;
                    }
                    if kb == KEY_TAG {
                        key_tag = Some(vb);
                    }
                    // chars().count() on validated UTF-8 counts non-continuation bytes
                    let kc = if k.is_ascii() { k.len() } else { k.chars().count() };
                    let vc = if v.is_ascii() { v.len() } else { v.chars().count() };
                    p.max_key_chars = p.max_key_chars.max(kc);
                    p.max_value_chars = p.max_value_chars.max(vc);
                }
            }
            let ntags = if keys.len() < 16 { keys.len() } else { key_set.len() };
            p.max_tags = p.max_tags.max(ntags);
            p.texts[T_KEY].push(key_tag)?;

            row[C_CACHE_WRITE_1H] = r.long()?;
            row[C_INPUT_AUDIO] = r.long()?;
            row[C_OUTPUT_AUDIO] = r.long()?;
            p.audio_micros.push(be_signed(r.bytes()?)?);
            row[C_CHARACTERS] = r.long()?;
            row[C_IMAGES] = r.long()?;
            let t = &mut p.texts;
            t[T_IMAGE_SIZE].push(Some(r.bytes()?))?;
            t[T_IMAGE_QUALITY].push(Some(r.bytes()?))?;
            row[C_REQUESTS] = r.long()?;
            t[T_SERVICE_TIER].push(Some(r.bytes()?))?;
            t[T_REGION].push(Some(r.bytes()?))?;
            t[T_USAGE_SOURCE].push(Some(r.bytes()?))?;
            p.counts.extend_from_slice(&row);
            p.n += 1;
        }
    }
    if r.pos != body.len() {
        return None; // trailing bytes
    }
    Some(p)
}

fn le_bytes_i64<'py>(py: Python<'py>, v: &[i64]) -> PyResult<Bound<'py, PyBytes>> {
    PyBytes::new_with(py, v.len() * 8, |buf| {
        for (chunk, x) in buf.chunks_exact_mut(8).zip(v) {
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        Ok(())
    })
}

fn le_bytes_u32<'py>(py: Python<'py>, v: &[u32]) -> PyResult<Bound<'py, PyBytes>> {
    PyBytes::new_with(py, v.len() * 4, |buf| {
        for (chunk, x) in buf.chunks_exact_mut(4).zip(v) {
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        Ok(())
    })
}

fn to_python<'py>(py: Python<'py>, p: &Parsed<'_>) -> PyResult<Bound<'py, PyTuple>> {
    let event_ids = PyList::new(py, p.event_ids.iter().map(|s| PyString::new(py, s)))?;
    let texts = PyDict::new(py);
    for (name, col) in TEXT_NAMES.iter().zip(&p.texts) {
        let values = PyList::new(
            py,
            col.values.iter().map(|v| match v {
                Some(s) => PyString::new(py, s).into_any(),
                None => py.None().into_bound(py),
            }),
        )?;
        let pair = PyTuple::new(py, [le_bytes_u32(py, &col.codes)?.into_any(), values.into_any()])?;
        texts.set_item(name, pair)?;
    }
    let stats = PyTuple::new(py, [p.max_tags, p.max_key_chars, p.max_value_chars])?;
    PyTuple::new(
        py,
        [
            p.n.into_pyobject(py)?.into_any(),
            event_ids.into_any(),
            le_bytes_i64(py, &p.event_time)?.into_any(),
            texts.into_any(),
            le_bytes_i64(py, &p.counts)?.into_any(),
            le_bytes_i64(py, &p.audio_micros)?.into_any(),
            stats.into_any(),
        ],
    )
}

/// decode_usage_batch(body: bytes) -> tuple | None
///
/// Decode the Avro body (after the 10-byte single-object header) of a UsageBatch written with
/// the current schema into columns; None if the body is malformed in any way (the caller then
/// decodes with fastavro for the exact error).
#[pyfunction]
fn decode_usage_batch<'py>(py: Python<'py>, body: &[u8]) -> PyResult<Option<Bound<'py, PyTuple>>> {
    match parse(body) {
        Some(p) => Ok(Some(to_python(py, &p)?)),
        None => Ok(None),
    }
}

/// priced_rows(value, priced_batch_fp, usage_batch_fp, usage_event_fp) -> int | None
///
/// The rows (prices) of a v5 PricedBatch message (whole, with its header) that `priced_native`
/// takes; None for a message it does not take (src/priced.rs).
#[pyfunction]
fn priced_rows(
    value: &[u8],
    priced_batch_fp: &[u8],
    usage_batch_fp: &[u8],
    usage_event_fp: &[u8],
) -> Option<usize> {
    let fp = priced::Fingerprints {
        priced_batch: priced_batch_fp,
        usage_batch: usage_batch_fp,
        usage_event: usage_event_fp,
    };
    priced::rows(value, &fp)
}

/// priced_native(values, priced_batch_fp, usage_batch_fp, usage_event_fp) -> (bytes, rows) | None
///
/// v5 PricedBatch messages as one ClickHouse Native block of NATIVE_STRUCTURE, one row per price
/// (b"" without rows); None if one of them is a message it does not take (src/priced.rs).
#[pyfunction]
fn priced_native<'py>(
    py: Python<'py>,
    values: Vec<Bound<'py, PyBytes>>,
    priced_batch_fp: &[u8],
    usage_batch_fp: &[u8],
    usage_event_fp: &[u8],
) -> PyResult<Option<(Bound<'py, PyBytes>, usize)>> {
    let fp = priced::Fingerprints {
        priced_batch: priced_batch_fp,
        usage_batch: usage_batch_fp,
        usage_event: usage_event_fp,
    };
    let slices: Vec<&[u8]> = values.iter().map(|v| v.as_bytes()).collect();
    let encoded = py.detach(|| priced::encode(&slices, &fp)); // the sink's other tasks run meanwhile
    Ok(encoded.map(|(block, rows)| (PyBytes::new(py, &block), rows)))
}

#[pymodule]
fn spendstream_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_usage_batch, m)?)?;
    m.add_function(wrap_pyfunction!(priced_rows, m)?)?;
    m.add_function(wrap_pyfunction!(priced_native, m)?)?;
    m.add(
        "NATIVE_STRUCTURE",
        format!("e {}, p {}, priced_at Int64", priced::EVENT_TYPE, priced::PRICE_TYPE),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn be_signed_values() {
        assert_eq!(be_signed(b""), Some(0));
        assert_eq!(be_signed(b"\x00"), Some(0));
        assert_eq!(be_signed(b"\xff"), Some(-1));
        assert_eq!(be_signed(b"\x01\x00"), Some(256));
        assert_eq!(be_signed(b"\x80\x00\x00\x00\x00\x00\x00\x00"), Some(i64::MIN));
        assert_eq!(be_signed(b"\x00\x00\x00\x00\x00\x00\x00\x00\x01"), None);
    }

    #[test]
    fn varints() {
        let mut r = Reader { buf: b"\x01", pos: 0 };
        assert_eq!(r.long(), Some(-1));
        let mut r = Reader { buf: b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", pos: 0 };
        assert_eq!(r.long(), Some(i64::MIN));
        let mut r = Reader { buf: b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01", pos: 0 };
        assert_eq!(r.long(), Some(i64::MAX));
        let mut r = Reader { buf: b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x02", pos: 0 };
        assert_eq!(r.long(), None);
        let mut r = Reader { buf: b"\x80", pos: 0 };
        assert_eq!(r.long(), None);
    }

    #[test]
    fn empty_batch() {
        let p = parse(b"\x00").unwrap();
        assert_eq!(p.n, 0);
        assert!(parse(b"").is_none());
        assert!(parse(b"\x00\x00").is_none());
    }
}
