//! Turn-taking for the slots' passes through the model: one pass at a time, in the order they
//! were asked for. With `--parallel N`, N sequences then share the cores a token (or a prompt
//! batch) each in turn, every pass with all threads, instead of N thread pools fighting over
//! the same cores; no sequence waits for more than one pass of each other sequence.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use kiln_engine::decoder::{Decoder, KvCache};
use kiln_runtime::exec::SessionError;

/// A ticket lock: passes run in the order their tickets were drawn.
#[derive(Default)]
pub struct Turns {
    /// The next ticket to hand out, and the ticket whose pass may run now.
    tickets: Mutex<(u64, u64)>,
    next: Condvar,
}

/// The right to run one pass; the next ticket's turn comes when it is dropped.
pub struct Turn<'a>(&'a Turns);

impl Turns {
    fn lock(&self) -> MutexGuard<'_, (u64, u64)> {
        // A pass that panicked left the counters consistent (they change under the lock only).
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for this caller's turn.
    pub fn take(&self) -> Turn<'_> {
        let mut tickets = self.lock();
        let mine = tickets.0;
        tickets.0 += 1;
        while tickets.1 != mine {
            tickets = self.next.wait(tickets).unwrap_or_else(|p| p.into_inner());
        }
        Turn(self)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.lock().1 += 1;
        self.0.next.notify_all();
    }
}

/// A decoder whose passes take turns with the other slots' decoders. A prompt runs in the
/// decoder's own batches, one turn each, so the logits are those of one whole call.
pub struct TurnTaking<'m> {
    pub inner: Box<dyn Decoder + 'm>,
    pub turns: Arc<Turns>,
}

impl Decoder for TurnTaking<'_> {
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError> {
        let batch = self.inner.batch().max(1);
        // The decoder splits a call into batches from its start; so do these turns.
        let last = tokens.len().saturating_sub(1) / batch * batch;
        let turns = Arc::clone(&self.turns);
        for chunk in tokens[..last].chunks(batch) {
            let _turn = turns.take();
            self.inner.forward(chunk)?;
        }
        let _turn = turns.take();
        self.inner.forward(&tokens[last..])
    }

    fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError> {
        let turns = Arc::clone(&self.turns);
        let _turn = turns.take();
        self.inner.forward_all(tokens)
    }

    fn position(&self) -> usize {
        self.inner.position()
    }

    fn context(&self) -> usize {
        self.inner.context()
    }

    fn batch(&self) -> usize {
        self.inner.batch()
    }

    fn rewind(&mut self, pos: usize) {
        self.inner.rewind(pos);
    }

    fn backend_name(&self) -> String {
        self.inner.backend_name()
    }

    fn kv_cache(&mut self) -> Option<KvCache<'_>> {
        self.inner.kv_cache()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_run_in_the_order_they_were_asked_for() {
        let turns = Arc::new(Turns::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = turns.take();
        let waiting: Vec<_> = (0..4)
            .map(|i| {
                let (mine, order) = (Arc::clone(&turns), Arc::clone(&order));
                let handle = std::thread::spawn(move || {
                    let _turn = mine.take();
                    order.lock().expect("order").push(i);
                });
                // Each thread draws its ticket before the next one starts.
                while turns.lock().0 != i + 2 {
                    std::thread::yield_now();
                }
                handle
            })
            .collect();
        drop(first);
        for handle in waiting {
            handle.join().expect("a waiter");
        }
        assert_eq!(*order.lock().expect("order"), vec![0, 1, 2, 3]);
    }
}
