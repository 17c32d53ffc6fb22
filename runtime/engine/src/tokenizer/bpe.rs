//! Byte-pair merging of one pre-token piece: the lowest-ranked adjacent pair merges first,
//! the leftmost one on ties, as tiktoken, Hugging Face `tokenizers` and llama.cpp all do.
//!
//! A heap of candidate pairs keeps a piece of n bytes at O(n log n), so a long run of one
//! character class (a megabyte of spaces) stays fast.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::PairMerge;

/// The id of a byte the vocabulary has no token for: it never merges and is not emitted.
pub(super) const NO_TOKEN: u32 = u32::MAX;

/// One current symbol: a byte range of the piece and the token it is, linked to its
/// neighbours. A merged-away symbol has `end == start`.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    end: usize,
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A pair that may merge. Ordered by rank, then by left index (leftmost first); the byte
/// ends tell whether both symbols are still exactly what they were when it was queued,
/// since a symbol only grows and never shrinks back to an earlier range.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    rank: u32,
    left: usize,
    left_end: usize,
    right_end: usize,
    merged: u32,
}

/// Buffers reused across the pieces of one `encode` call.
#[derive(Default)]
pub(super) struct Scratch {
    symbols: Vec<Symbol>,
    heap: BinaryHeap<Reverse<Candidate>>,
}

/// Appends the ids of `piece` to `out`. `pair(left, right, joined_bytes)` ranks a pair;
/// `byte_ids` holds [`NO_TOKEN`] for bytes without a token.
pub(super) fn merge(
    piece: &[u8],
    byte_ids: &[u32; 256],
    scratch: &mut Scratch,
    out: &mut Vec<u32>,
    pair: impl Fn(u32, u32, &[u8]) -> Option<PairMerge>,
) {
    let Scratch { symbols, heap } = scratch;
    symbols.clear();
    heap.clear();
    let n = piece.len();
    symbols.extend(piece.iter().enumerate().map(|(i, &byte)| Symbol {
        start: i,
        end: i + 1,
        id: byte_ids[usize::from(byte)],
        prev: i.checked_sub(1),
        next: (i + 1 < n).then_some(i + 1),
    }));
    let push = |symbols: &[Symbol], heap: &mut BinaryHeap<Reverse<Candidate>>, left: usize| {
        let Some(l) = symbols.get(left) else { return };
        let Some(r) = l.next.and_then(|right| symbols.get(right)) else {
            return;
        };
        let Some(joined) = piece.get(l.start..r.end) else {
            return;
        };
        if let Some(PairMerge { rank, merged }) = pair(l.id, r.id, joined) {
            heap.push(Reverse(Candidate {
                rank,
                left,
                left_end: l.end,
                right_end: r.end,
                merged,
            }));
        }
    };
    for left in 0..n.saturating_sub(1) {
        push(symbols, heap, left);
    }
    while let Some(Reverse(c)) = heap.pop() {
        let Some(&l) = symbols.get(c.left) else {
            continue;
        };
        let Some(right) = l.next else { continue };
        let Some(&r) = symbols.get(right) else {
            continue;
        };
        if l.end != c.left_end || r.end != c.right_end {
            continue;
        }
        if let Some(sym) = symbols.get_mut(c.left) {
            sym.end = r.end;
            sym.id = c.merged;
            sym.next = r.next;
        }
        if let Some(sym) = symbols.get_mut(right) {
            sym.end = sym.start;
        }
        if let Some(sym) = r.next.and_then(|after| symbols.get_mut(after)) {
            sym.prev = Some(c.left);
        }
        if let Some(before) = l.prev {
            push(symbols, heap, before);
        }
        push(symbols, heap, c.left);
    }
    let mut at = (n > 0).then_some(0);
    while let Some(sym) = at.and_then(|i| symbols.get(i)) {
        if sym.id != NO_TOKEN {
            out.push(sym.id);
        }
        at = sym.next;
    }
}
