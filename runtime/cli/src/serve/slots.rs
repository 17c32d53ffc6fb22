//! The generation slots: `--parallel` threads, each with its own conversation (a KV cache
//! allocated at start-up, so memory is known before the first request), fed from one bounded
//! queue. A job goes to the idle slot whose cache shares the longest prefix with its prompt
//! (the next turn of a chat lands where its start already is); when every slot is busy and the
//! queue is full, a job is refused and the client told to retry.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_engine::constrain::Guide;
use kiln_engine::conversation::Conversation;
use kiln_engine::decoder::Decoder;
use kiln_engine::generate::{GenerateOptions, Generated, Model, StopReason};
use kiln_runtime::exec::SessionOptions;
use kiln_runtime::sampler::Sampler;
use tokio::sync::mpsc::UnboundedSender;

use super::log;
use super::metrics::Metrics;
use super::turns::{TurnTaking, Turns};

/// One request's generation, as a slot runs it.
pub struct Job {
    /// Names the request in the log.
    pub id: String,
    pub ids: Vec<u32>,
    /// The ids every conversation with this start shares (saved and loaded with
    /// `--prompt-cache`).
    pub prefix: Option<Vec<u32>>,
    pub sampler: Sampler,
    /// Its `cancel` flag is the request's: set when the client goes away or the server stops.
    pub opts: GenerateOptions,
    pub guide: Option<Guide>,
    pub events: UnboundedSender<Event>,
}

/// What a slot sends back while it runs a job.
pub enum Event {
    /// Reply text, final (stop strings already cut).
    Text(String),
    Done(Box<Finished>),
    /// The generation failed; the message says why.
    Failed(String),
}

/// A finished generation and what it cost.
pub struct Finished {
    pub out: Generated,
    /// Prompt tokens found in the slot's cache.
    pub cached: usize,
}

/// Why a job was not queued.
pub enum Refused {
    /// Every slot is busy and the queue holds this many jobs.
    Full(usize),
    /// The server is shutting down.
    Stopping,
}

/// How busy the slots are.
pub struct Load {
    pub slots: usize,
    pub busy: usize,
    pub queued: usize,
}

/// The slot threads and their queue.
pub struct Slots {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Tokens of context each slot's cache holds.
    pub context: usize,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    queue_limit: usize,
    metrics: Arc<Metrics>,
}

struct State {
    queue: VecDeque<(Job, Instant)>,
    slots: Vec<Slot>,
    stopping: bool,
}

/// What the scheduler knows of a slot.
#[derive(Default)]
struct Slot {
    idle: bool,
    /// The ids in its cache when it last finished.
    cached: Vec<u32>,
    /// The job handed to it, not yet taken.
    handed: Option<(Job, Instant)>,
    /// The cancel flag of the job it runs.
    running: Option<Arc<AtomicBool>>,
}

/// What a slot thread needs besides the scheduler.
pub struct SlotConfig {
    pub parallel: usize,
    pub queue_limit: usize,
    pub session: SessionOptions,
    pub prompt_cache: Option<PathBuf>,
}

impl Slots {
    /// Starts `config.parallel` slots, each with its decoder allocated now; fails (and stops
    /// those started) if any cannot allocate.
    pub fn start(
        model: Arc<Model>,
        config: SlotConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Slots> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                slots: (0..config.parallel).map(|_| Slot::default()).collect(),
                stopping: false,
            }),
            wake: Condvar::new(),
            queue_limit: config.queue_limit,
            metrics,
        });
        let turns = Arc::new(Turns::default());
        let (ready, started) = mpsc::channel();
        let threads = (0..config.parallel)
            .map(|slot| {
                let (model, shared, turns, ready) = (
                    Arc::clone(&model),
                    Arc::clone(&shared),
                    Arc::clone(&turns),
                    ready.clone(),
                );
                let (session, parallel) = (config.session.clone(), config.parallel);
                let prompt_cache = config.prompt_cache.clone();
                std::thread::Builder::new()
                    .name(format!("kiln-slot-{slot}"))
                    .spawn(move || {
                        let decoder = match model.decoder(session) {
                            Ok(d) => d,
                            Err(e) => {
                                let _ = ready.send(Err(format!("slot {slot}: {e}")));
                                return;
                            }
                        };
                        let decoder: Box<dyn Decoder + '_> = if parallel > 1 {
                            Box::new(TurnTaking {
                                inner: decoder,
                                turns,
                            })
                        } else {
                            decoder
                        };
                        let mut conversation = Conversation::new(&model, decoder);
                        let _ = ready.send(Ok(conversation.context()));
                        drop(ready);
                        work(&shared, slot, &mut conversation, prompt_cache.as_deref());
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(ready);
        let mut slots = Slots {
            shared,
            threads,
            context: 0,
        };
        for _ in 0..config.parallel {
            match started.recv() {
                Ok(Ok(context)) => slots.context = context,
                Ok(Err(e)) => {
                    slots.join();
                    anyhow::bail!("{e}");
                }
                Err(_) => {
                    slots.join();
                    anyhow::bail!("a slot thread ended while starting");
                }
            }
        }
        Ok(slots)
    }

    /// Queues `job` (or hands it to an idle slot at once).
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let mut state = self.shared.lock();
        if state.stopping {
            return Err(Refused::Stopping);
        }
        let idle = state.slots.iter().filter(|s| s.idle).count();
        if idle == 0 && state.queue.len() >= self.shared.queue_limit {
            return Err(Refused::Full(state.queue.len()));
        }
        state.queue.push_back((job, Instant::now()));
        if assign(&mut state) {
            self.shared.wake.notify_all();
        }
        Ok(())
    }

    pub fn load(&self) -> Load {
        let state = self.shared.lock();
        Load {
            slots: state.slots.len(),
            busy: state.slots.iter().filter(|s| !s.idle).count(),
            queued: state.queue.len(),
        }
    }

    /// Refuses new jobs from now on; queued and running ones go on.
    pub fn stop_accepting(&self) {
        self.shared.lock().stopping = true;
    }

    /// Cancels every queued and running job (each ends before its next token).
    pub fn cancel_all(&self) {
        let state = self.shared.lock();
        let queued = state.queue.iter().map(|(job, _)| &job.opts.cancel);
        let handed = state
            .slots
            .iter()
            .filter_map(|s| s.handed.as_ref().map(|(job, _)| &job.opts.cancel));
        for flag in queued.chain(handed).flatten() {
            flag.store(true, Ordering::Relaxed);
        }
        for flag in state.slots.iter().filter_map(|s| s.running.as_ref()) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Stops the slots once the queue is empty and waits for their threads.
    pub fn join(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.join();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state changes only under the lock and never half-way; a panic elsewhere cannot
        // leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `slot` idle with `cached` in its cache and waits for its next job; `None` when
    /// the server stops.
    fn next(&self, slot: usize, cached: &[u32]) -> Option<(Job, Instant)> {
        let mut state = self.lock();
        let me = &mut state.slots[slot];
        me.idle = true;
        me.running = None;
        me.cached.clear();
        me.cached.extend_from_slice(cached);
        if assign(&mut state) {
            self.wake.notify_all();
        }
        loop {
            let me = &mut state.slots[slot];
            if let Some((job, queued)) = me.handed.take() {
                me.running = job.opts.cancel.clone();
                return Some((job, queued));
            }
            if state.stopping && state.queue.is_empty() {
                return None;
            }
            state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Hands queued jobs, oldest first, to idle slots: each to the one whose cache shares the
/// longest prefix with its prompt. Returns whether any was handed.
fn assign(state: &mut State) -> bool {
    let mut any = false;
    while let Some((job, _)) = state.queue.front() {
        let best = state
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.idle)
            .max_by_key(|(i, s)| (shared_prefix(&s.cached, &job.ids), std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        let Some(i) = best else {
            break;
        };
        let Some(job) = state.queue.pop_front() else {
            break;
        };
        let slot = &mut state.slots[i];
        slot.idle = false;
        slot.handed = Some(job);
        any = true;
    }
    any
}

fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A slot's loop: take a job, generate, send the text and the outcome back.
fn work(shared: &Shared, slot: usize, conversation: &mut Conversation, cache_dir: Option<&Path>) {
    while let Some((mut job, queued_at)) = shared.next(slot, conversation.cached()) {
        let queued = queued_at.elapsed();
        let cancel = job.opts.cancel.clone().unwrap_or_default();
        if cancel.load(Ordering::Relaxed) {
            // Cancelled while queued: nothing runs.
            let _ = job.events.send(Event::Done(Box::new(Finished {
                out: Generated {
                    ids: Vec::new(),
                    text: String::new(),
                    stop: StopReason::Cancelled,
                    logprobs: Vec::new(),
                    prompt_time: Duration::ZERO,
                },
                cached: 0,
            })));
            continue;
        }
        if let (Some(dir), Some(prefix)) = (cache_dir, &job.prefix) {
            resume(conversation, dir, prefix);
        }
        let started = Instant::now();
        let events = job.events.clone();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            conversation.generate_guided(
                &job.ids,
                &mut job.sampler,
                &job.opts,
                job.guide.as_mut(),
                |piece| {
                    // A client that went away stops its generation before the next token.
                    if !piece.is_empty() && events.send(Event::Text(piece.to_owned())).is_err() {
                        cancel.store(true, Ordering::Relaxed);
                    }
                },
            )
        }));
        let event = match result {
            Ok(Ok(out)) => {
                let cached = conversation.reused();
                report(shared, slot, &job, &out, cached, queued, started.elapsed());
                Event::Done(Box::new(Finished { out, cached }))
            }
            Ok(Err(e)) => Event::Failed(e.to_string()),
            Err(_) => {
                conversation.clear();
                log(format_args!(
                    "{}: generation failed unexpectedly; slot {slot}'s cache was reset",
                    job.id
                ));
                Event::Failed("the generation failed unexpectedly".into())
            }
        };
        let _ = job.events.send(event);
    }
}

/// The request's log line and its share of the metrics.
fn report(
    shared: &Shared,
    slot: usize,
    job: &Job,
    out: &Generated,
    cached: usize,
    queued: Duration,
    total: Duration,
) {
    let ran = job.ids.len() - cached;
    let decode = total.saturating_sub(out.prompt_time);
    let rate = out.ids.len().saturating_sub(1) as f64 / decode.as_secs_f64().max(1e-9);
    shared
        .metrics
        .finished(ran, cached, out.ids.len(), out.prompt_time, decode);
    log(format_args!(
        "{} slot {slot}: prompt {} tokens ({cached} cached) in {:.0} ms, {} tokens at {rate:.1} t/s, \
         first token {:.0} ms after arrival (queued {:.0} ms), stop: {}",
        job.id,
        job.ids.len(),
        out.prompt_time.as_secs_f64() * 1e3,
        out.ids.len(),
        (queued + out.prompt_time).as_secs_f64() * 1e3,
        queued.as_secs_f64() * 1e3,
        serde_json::to_value(out.stop)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
    ));
}

/// Makes the cache start with `prefix`: already there, loaded from its snapshot in `dir`, or
/// computed and saved there. A snapshot that cannot be used or saved is logged and the request
/// goes on without it.
fn resume(conversation: &mut Conversation, dir: &Path, prefix: &[u32]) {
    if prefix.is_empty() || conversation.cached().starts_with(prefix) {
        return;
    }
    let ids: Vec<u8> = prefix.iter().flat_map(|id| id.to_le_bytes()).collect();
    let path = dir.join(format!(
        "{:08x}-{}.kilnsnap",
        crc32fast::hash(&ids),
        prefix.len()
    ));
    if path.exists() {
        match conversation.load_snapshot(&path) {
            Ok(_) if conversation.cached() == prefix => return,
            Ok(_) => log(format_args!(
                "{} holds another start; saving it again",
                path.display()
            )),
            Err(e) => log(format_args!("prompt cache: {e}")),
        }
    }
    let saved = std::fs::create_dir_all(dir)
        .map_err(|e| e.to_string())
        .and_then(|()| conversation.prefill(prefix).map_err(|e| e.to_string()))
        .and_then(|()| conversation.save_snapshot(&path).map_err(|e| e.to_string()));
    if let Err(e) = saved {
        log(format_args!("prompt cache {}: {e}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(ids: &[u32]) -> (Job, tokio::sync::mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            id: format!("{ids:?}"),
            ids: ids.to_vec(),
            prefix: None,
            sampler: Sampler::new(kiln_runtime::sampler::SamplerConfig::greedy(), 8),
            opts: GenerateOptions {
                max_tokens: 1,
                stop: Vec::new(),
                cancel: None,
                top_logprobs: None,
            },
            guide: None,
            events,
        };
        (job, rx)
    }

    fn state(slots: usize) -> State {
        State {
            queue: VecDeque::new(),
            slots: (0..slots).map(|_| Slot::default()).collect(),
            stopping: false,
        }
    }

    #[test]
    fn a_job_waits_while_every_slot_is_busy_and_goes_to_the_first_that_frees() {
        let mut s = state(1);
        let (j, _rx) = job(&[1, 2]);
        s.queue.push_back((j, Instant::now()));
        assert!(!assign(&mut s));
        assert_eq!(s.queue.len(), 1, "the job stays queued");
        s.slots[0].idle = true;
        assert!(assign(&mut s));
        assert!(s.queue.is_empty());
        assert_eq!(
            s.slots[0].handed.as_ref().map(|(j, _)| j.ids.clone()),
            Some(vec![1, 2])
        );
    }

    #[test]
    fn a_job_goes_to_the_idle_slot_whose_cache_shares_most_of_its_prompt() {
        let mut s = state(3);
        for (slot, cached) in s.slots.iter_mut().zip([vec![1, 9], vec![1, 2, 3], vec![]]) {
            slot.idle = true;
            slot.cached = cached;
        }
        let (a, _ra) = job(&[1, 2, 3, 4]);
        let (b, _rb) = job(&[1, 9, 9]);
        let (c, _rc) = job(&[5]);
        s.queue.extend([a, b, c].map(|j| (j, Instant::now())));
        assert!(assign(&mut s));
        let handed: Vec<Option<Vec<u32>>> = s
            .slots
            .iter()
            .map(|slot| slot.handed.as_ref().map(|(j, _)| j.ids.clone()))
            .collect();
        assert_eq!(
            handed,
            [Some(vec![1, 9, 9]), Some(vec![1, 2, 3, 4]), Some(vec![5])]
        );
    }
}
