//! Intrusive doubly-linked queues over the slot table.
//!
//! Every policy orders items with these queues (LRU's recency list, the FIFOs of the modern
//! policy); the links live in the slot itself, so moving an item costs no allocation, and
//! switching policy only re-threads existing slots.

use std::fmt;

/// "No slot": the end of a queue.
pub const NIL: u32 = u32::MAX;

/// Head/tail of one queue; links are stored by the caller in `Links`.
#[derive(Clone, Copy, Debug)]
pub struct Queue {
    pub head: u32,
    pub tail: u32,
    pub len: usize,
    pub bytes: usize,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            head: NIL,
            tail: NIL,
            len: 0,
            bytes: 0,
        }
    }
}

/// Per-slot links, kept in a dense vector next to the items.
#[derive(Clone, Copy)]
pub struct Link {
    pub prev: u32,
    pub next: u32,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}<->{}", self.prev, self.next)
    }
}

impl Default for Link {
    fn default() -> Self {
        Link {
            prev: NIL,
            next: NIL,
        }
    }
}

/// Inserts `id` at the head (the "newest" end) of `q`.
pub fn push_head(links: &mut [Link], q: &mut Queue, id: u32, cost: usize) {
    let old = q.head;
    links[id as usize] = Link {
        prev: NIL,
        next: old,
    };
    if old == NIL {
        q.tail = id;
    } else {
        links[old as usize].prev = id;
    }
    q.head = id;
    q.len += 1;
    q.bytes += cost;
}

/// Unlinks `id`, which must be in `q`.
pub fn unlink(links: &mut [Link], q: &mut Queue, id: u32, cost: usize) {
    let Link { prev, next } = links[id as usize];
    if prev == NIL {
        q.head = next;
    } else {
        links[prev as usize].next = next;
    }
    if next == NIL {
        q.tail = prev;
    } else {
        links[next as usize].prev = prev;
    }
    links[id as usize] = Link::default();
    q.len -= 1;
    q.bytes -= cost;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(links: &[Link], q: &Queue) -> Vec<u32> {
        let mut out = Vec::new();
        let mut at = q.head;
        while at != NIL {
            out.push(at);
            at = links[at as usize].next;
        }
        out
    }

    #[test]
    fn push_and_unlink_keep_both_directions_consistent() {
        let mut links = vec![Link::default(); 5];
        let mut q = Queue::default();
        for id in 0..5 {
            push_head(&mut links, &mut q, id, 10);
        }
        assert_eq!(order(&links, &q), vec![4, 3, 2, 1, 0]);
        unlink(&mut links, &mut q, 2, 10);
        unlink(&mut links, &mut q, 4, 10);
        unlink(&mut links, &mut q, 0, 10);
        assert_eq!(order(&links, &q), vec![3, 1]);
        assert_eq!((q.head, q.tail, q.len, q.bytes), (3, 1, 2, 20));
        assert_eq!(links[1].next, NIL);
        assert_eq!(links[3].prev, NIL);
    }
}
