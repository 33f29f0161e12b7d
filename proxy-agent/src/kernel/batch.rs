//! Maps read and written in batches (`BPF_MAP_LOOKUP_BATCH` and
//! `BPF_MAP_UPDATE_BATCH`, Linux 5.6): a system call per few thousand
//! entries, where aya's iterator makes two per entry (next key, then
//! lookup) and its insert one.
//!
//! The resync reads the services, backends, reverse-NAT and Maglev maps
//! this way every `--resync-seconds`; a round writes its runs of puts into
//! one map this way (at the first sync, millions of entries). A kernel or
//! map type that refuses batches (LPM tries have none) is read or written
//! one entry at a time, as before.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, IterableMap, MapData},
    Pod,
};

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// What the kernel returns for a map type without batch operations (its
/// own `ENOTSUPP`, which is not `EOPNOTSUPP`).
const ENOTSUPP: i32 = 524;
/// `BPF_MAP_UPDATE_BATCH`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Entries written per call: the kernel copies them one at a time from the
/// buffers, so a larger call saves nothing more.
const UPDATE_CHUNK: usize = 4096;
/// Entries asked for per call at first; a bucket with more (ENOSPC) makes
/// the next call ask for more.
const FIRST_CHUNK: usize = 4096;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// How a whole map is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    /// In batches where the kernel has them, else one entry at a time.
    Batched,
    /// One entry at a time (two system calls each): the fallback, and the
    /// benchmark's baseline.
    OneByOne,
}

/// How a round's runs of puts are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writing {
    /// In batches where the kernel has them, else one entry at a time.
    Batched,
    /// One entry at a time: the fallback, and the benchmark's baseline.
    OneByOne,
}

/// What a batched write came to.
#[derive(Debug)]
pub enum Updated {
    /// Every entry landed.
    All,
    /// The first `landed` entries landed; the next one failed with `error`,
    /// and none after it was tried.
    Stopped { landed: usize, error: io::Error },
    /// The kernel has no batched writes for this map: nothing was written.
    Refused,
}

/// Writes `entries` into `map` in order (flags 0: create or replace), a
/// few thousand per system call, stopping at the first that fails.
pub fn update<K: Pod, V: Pod>(map: &MapData, entries: &[(K, V)]) -> Updated {
    let fd = map.fd().as_fd().as_raw_fd();
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    let mut landed = 0;
    for chunk in entries.chunks(UPDATE_CHUNK) {
        let mut keys = Vec::with_capacity(chunk.len() * key_size);
        let mut values = Vec::with_capacity(chunk.len() * value_size);
        for (key, value) in chunk {
            // SAFETY: both types are plain data (`Pod`) of these sizes.
            unsafe {
                keys.extend_from_slice(std::slice::from_raw_parts(
                    (key as *const K).cast::<u8>(),
                    key_size,
                ));
                values.extend_from_slice(std::slice::from_raw_parts(
                    (value as *const V).cast::<u8>(),
                    value_size,
                ));
            }
        }
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: u32::try_from(chunk.len()).unwrap_or(u32::MAX),
            map_fd: u32::try_from(fd).unwrap_or(u32::MAX),
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `count` keys and values, alive across
        // the call; the kernel only reads them.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        if ret < 0 {
            let error = io::Error::last_os_error();
            let done = (attr.count as usize).min(chunk.len());
            // No batches for this kernel or map type: refused before the
            // first entry. (An entry the map refuses fails the same way as
            // written alone, and the caller reads why from that.)
            let refused = matches!(
                error.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
            );
            if refused && landed == 0 && done == 0 {
                return Updated::Refused;
            }
            return Updated::Stopped {
                landed: landed + done,
                error,
            };
        }
        landed += chunk.len();
    }
    Updated::All
}

/// Every entry of `map`, read as `reading` says.
pub fn entries<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    reading: Reading,
) -> Result<Vec<(K, V)>> {
    if reading == Reading::Batched {
        if let Some(entries) = lookup_batch(map.map()).context("reading a map in batches")? {
            return Ok(entries);
        }
    }
    Ok(map.iter().collect::<Result<_, _>>()?)
}

/// Every value of the array `map`, in index order, read as `reading` says
/// (arrays have batches where hash maps do).
pub fn array_values<V: Pod>(map: &Array<MapData, V>, reading: Reading) -> Result<Vec<V>> {
    if reading == Reading::Batched {
        if let Some(entries) =
            lookup_batch::<u32, V>(map.map()).context("reading an array in batches")?
        {
            return Ok(entries.into_iter().map(|(_, v)| v).collect());
        }
    }
    Ok(map.iter().collect::<Result<_, _>>()?)
}

/// The whole map in batches; None if the kernel refuses them for it.
fn lookup_batch<K: Pod, V: Pod>(map: &MapData) -> io::Result<Option<Vec<(K, V)>>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    let mut out = Vec::new();
    let mut chunk = FIRST_CHUNK;
    // The position the kernel hands back (a bucket index for hash maps).
    let mut position = [0u8; 8];
    let mut next = [0u8; 8];
    let mut first = true;
    loop {
        let mut keys = vec![0u8; chunk * key_size];
        let mut values = vec![0u8; chunk * value_size];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { position.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: u32::try_from(fd).unwrap_or(u32::MAX),
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `count` keys and values, and
        // at two 8-byte positions, all alive across the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let error = (ret < 0).then(io::Error::last_os_error);
        let errno = error.as_ref().and_then(io::Error::raw_os_error);
        match errno {
            None | Some(libc::ENOENT) => {}
            // A bucket holds more entries than asked for: ask for more.
            Some(libc::ENOSPC) => {
                chunk *= 2;
                continue;
            }
            // No batches for this kernel or map type.
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if first => return Ok(None),
            Some(_) => return Err(error.unwrap_or_else(io::Error::last_os_error)),
        }
        let got = attr.count as usize;
        for i in 0..got {
            // SAFETY: the kernel wrote `got` keys and values of these sizes;
            // both types are plain data.
            let (key, value) = unsafe {
                (
                    keys.as_ptr().add(i * key_size).cast::<K>().read_unaligned(),
                    values
                        .as_ptr()
                        .add(i * value_size)
                        .cast::<V>()
                        .read_unaligned(),
                )
            };
            out.push((key, value));
        }
        if errno == Some(libc::ENOENT) {
            return Ok(Some(out));
        }
        position = next;
        first = false;
    }
}
