//! One cached item in a single allocation from its shard's arena: a fixed header, the key,
//! then the value.
//!
//! Why hand-rolled: the memory target is under 48 bytes of overhead per item, and a
//! `Box<[u8]>` per item costs a 16-byte fat pointer in the slot table plus a separate key
//! allocation in any ready-made map. Keeping header, key and value in one allocation behind
//! an 8-byte thin pointer lets the slot table spend 16 bytes per item in total (pointer plus
//! two list links). Together with `arena`, this module holds all unsafe code of the store.
//!
//! An `Item` does not free itself: its memory belongs to the arena it came from, so it is
//! given back explicitly with `free` (or wholesale when the shard is cleared).

use std::fmt;
use std::ptr::NonNull;

use super::arena::Arena;

/// Header layout (little-endian, unaligned reads): cas u48 | expiry u32 | flags u32 |
/// value length u32 | key length u8 | policy bits u8. Twenty bytes: with the 132-byte payload
/// of the memory benchmark an item is a 152-byte request, which glibc serves from a 160-byte
/// chunk; two more header bytes would cost a 176-byte chunk.
const CAS: usize = 0;
const EXPIRY: usize = 6;
const FLAGS: usize = 10;
const VLEN: usize = 14;
const KLEN: usize = 18;
const BITS: usize = 19;
/// Bytes of header before the key.
pub const HEADER_LEN: usize = 20;
/// CAS values are 48-bit: 2^44 changes per shard (at 16 shards) before they wrap.
pub const CAS_MASK: u64 = (1 << 48) - 1;
/// Owning thin pointer to an item allocation.
pub struct Item {
    ptr: NonNull<u8>,
}

// SAFETY: `Item` owns its allocation exclusively (no interior sharing), like `Box<[u8]>`.
unsafe impl Send for Item {}
// SAFETY: shared references only read the allocation.
unsafe impl Sync for Item {}

impl Item {
    /// Allocates an item in `arena`. `key` must be at most 255 bytes (the protocol limits keys
    /// to 250).
    pub fn new(
        arena: &mut Arena,
        key: &[u8],
        value: &[u8],
        flags: u32,
        expiry: u32,
        cas: u64,
    ) -> Item {
        debug_assert!(key.len() <= usize::from(u8::MAX));
        let key_len = key.len().min(usize::from(u8::MAX));
        let value_len = u32::try_from(value.len()).unwrap_or(u32::MAX) as usize;
        let total = HEADER_LEN + key_len + value_len;
        let ptr = arena.alloc(total);
        // SAFETY: `ptr` points to `total` writable bytes; the copies stay inside that range and
        // source and destination cannot overlap (fresh allocation).
        unsafe {
            let base = ptr.as_ptr();
            base.add(CAS).cast::<[u8; 6]>().write_unaligned(cas48(cas));
            base.add(EXPIRY)
                .cast::<[u8; 4]>()
                .write_unaligned(expiry.to_le_bytes());
            base.add(FLAGS)
                .cast::<[u8; 4]>()
                .write_unaligned(flags.to_le_bytes());
            base.add(VLEN)
                .cast::<[u8; 4]>()
                .write_unaligned((value_len as u32).to_le_bytes());
            base.add(KLEN).write(key_len as u8);
            base.add(BITS).write(0);
            std::ptr::copy_nonoverlapping(key.as_ptr(), base.add(HEADER_LEN), key_len);
            std::ptr::copy_nonoverlapping(
                value.as_ptr(),
                base.add(HEADER_LEN + key_len),
                value_len,
            );
        }
        Item { ptr }
    }

    /// Gives the item's memory back to the arena it was allocated from.
    pub fn free(self, arena: &mut Arena) {
        let len = self.alloc_len();
        // SAFETY: allocated by `new` from this arena with this length; `self` is consumed.
        unsafe { arena.free(self.ptr, len) }
    }

    /// Whether the allocation lives in the arena's pages (freed wholesale by `reset`).
    pub fn is_small(&self) -> bool {
        self.alloc_len() <= super::arena::SMALL_MAX
    }

    fn header<const N: usize>(&self, at: usize) -> [u8; N] {
        // SAFETY: every header field lies inside the allocation (HEADER_LEN bytes at least).
        unsafe { self.ptr.as_ptr().add(at).cast::<[u8; N]>().read_unaligned() }
    }

    fn set_header<const N: usize>(&mut self, at: usize, bytes: [u8; N]) {
        // SAFETY: as in `header`, and `&mut self` gives exclusive access.
        unsafe {
            self.ptr
                .as_ptr()
                .add(at)
                .cast::<[u8; N]>()
                .write_unaligned(bytes)
        }
    }

    pub fn cas(&self) -> u64 {
        let b: [u8; 6] = self.header(CAS);
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], 0, 0])
    }
    pub fn set_cas(&mut self, cas: u64) {
        self.set_header(CAS, cas48(cas));
    }
    /// Absolute expiry in Unix seconds; 0 means never.
    pub fn expiry(&self) -> u32 {
        u32::from_le_bytes(self.header(EXPIRY))
    }
    pub fn set_expiry(&mut self, expiry: u32) {
        self.set_header(EXPIRY, expiry.to_le_bytes());
    }
    pub fn flags(&self) -> u32 {
        u32::from_le_bytes(self.header(FLAGS))
    }
    fn key_len(&self) -> usize {
        usize::from(self.header::<1>(KLEN)[0])
    }
    fn value_len(&self) -> usize {
        u32::from_le_bytes(self.header(VLEN)) as usize
    }
    /// Per-policy bookkeeping bits (visited, frequency, queue).
    pub fn bits(&self) -> u8 {
        self.header::<1>(BITS)[0]
    }
    pub fn set_bits(&mut self, bits: u8) {
        self.set_header(BITS, [bits]);
    }

    pub fn key(&self) -> &[u8] {
        // SAFETY: the key occupies `key_len` bytes after the header, initialised in `new`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(HEADER_LEN), self.key_len()) }
    }

    pub fn value(&self) -> &[u8] {
        // SAFETY: the value follows the key and was initialised in `new`.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().add(HEADER_LEN + self.key_len()),
                self.value_len(),
            )
        }
    }

    /// Bytes of the allocation itself (header, key and value).
    pub fn alloc_len(&self) -> usize {
        HEADER_LEN + self.key_len() + self.value_len()
    }

    /// Whether the item is expired at `now` (Unix seconds).
    pub fn is_expired(&self, now: u32) -> bool {
        let expiry = self.expiry();
        expiry != 0 && expiry <= now
    }
}

fn cas48(cas: u64) -> [u8; 6] {
    let b = (cas & CAS_MASK).to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Item")
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("len", &self.value_len())
            .field("flags", &self.flags())
            .field("expiry", &self.expiry())
            .field("cas", &self.cas())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let mut arena = Arena::default();
        let mut item = Item::new(
            &mut arena,
            b"key",
            b"value\r\n\0bytes",
            0xdead_beef,
            1234,
            CAS_MASK - 1,
        );
        assert_eq!(item.key(), b"key");
        assert_eq!(item.value(), b"value\r\n\0bytes");
        assert_eq!(item.flags(), 0xdead_beef);
        assert_eq!(item.expiry(), 1234);
        assert_eq!(item.cas(), CAS_MASK - 1);
        item.set_bits(0b101);
        item.set_cas(7);
        item.set_expiry(0);
        assert_eq!((item.bits(), item.cas(), item.expiry()), (0b101, 7, 0));
        assert_eq!(item.alloc_len(), HEADER_LEN + 3 + 13);
        assert!(!item.is_expired(u32::MAX));
        item.free(&mut arena);
    }

    #[test]
    fn empty_value_and_max_key() {
        let key = [b'k'; 250];
        let mut arena = Arena::default();
        let item = Item::new(&mut arena, &key, b"", 0, 10, 1);
        assert_eq!(item.key(), &key[..]);
        assert!(item.value().is_empty());
        assert!(item.is_expired(10));
        assert!(!item.is_expired(9));
        let big = Item::new(&mut arena, b"big", &[7; 5000], 0, 0, 1);
        assert!(!big.is_small() && item.is_small());
        assert_eq!(big.value(), &[7; 5000][..]);
        big.free(&mut arena);
        item.free(&mut arena);
    }
}
