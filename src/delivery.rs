//! Webhook deliveries: the HTTP POSTs, made on threads of the flush worker.
//!
//! The worker (src/worker.rs) claims due deliveries from `keypal.webhook_queue` in a
//! transaction, hands them to this pool, and records what came back
//! (`keypal.finish_deliveries`). The threads here never touch PostgreSQL: they get a job,
//! POST it, and send the outcome back; every signal is blocked on them, so PostgreSQL's
//! handlers keep running on the worker's own thread. A receiver that is slow holds one
//! thread until its timeout; others go on, on the other threads. Each answer wakes the
//! worker (SIGUSR1, whose handler sets its latch).

use crate::net::is_public;
use crate::signature::webhook_signature;
use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Deliveries one worker has in flight at most (one thread each).
pub const MAX_IN_FLIGHT: usize = 128;

/// One delivery to make.
pub struct Job {
    pub webhook_id: i64,
    pub event_id: i64,
    pub attempt: i32,
    pub url: String,
    pub secret: String,
    pub body: String,
    pub timeout: Duration,
    pub allow_private: bool,
}

/// How a delivery attempt ended: the HTTP status, or why there is none.
pub struct Done {
    pub webhook_id: i64,
    pub event_id: i64,
    pub attempt: i32,
    pub status: Option<i32>,
    pub error: Option<String>,
}

/// The delivery threads, and what each webhook has in flight.
pub struct Pool {
    jobs: mpsc::Sender<Job>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    done_tx: mpsc::Sender<Done>,
    done: mpsc::Receiver<Done>,
    threads: usize,
    in_flight: HashMap<i64, i32>,
}

impl Default for Pool {
    fn default() -> Self {
        let (jobs, queue) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        Pool {
            jobs,
            queue: Arc::new(Mutex::new(queue)),
            done_tx,
            done,
            threads: 0,
            in_flight: HashMap::new(),
        }
    }
}

impl Pool {
    /// Deliveries in flight, in all.
    pub fn in_flight(&self) -> usize {
        self.in_flight.values().map(|&n| n as usize).sum()
    }

    /// Per webhook: (ids, deliveries in flight), for the claim.
    pub fn busy(&self) -> (Vec<i64>, Vec<i32>) {
        self.in_flight
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(&k, &n)| (k, n))
            .unzip()
    }

    /// Starts a delivery; a thread is added when every one is busy.
    pub fn submit(&mut self, job: Job) {
        *self.in_flight.entry(job.webhook_id).or_default() += 1;
        if self.in_flight() > self.threads {
            let queue = Arc::clone(&self.queue);
            let done = self.done_tx.clone();
            if spawn_without_signals(move || run(&queue, &done)).is_ok() {
                self.threads += 1;
            } else if self.threads == 0 {
                // No thread to take it: answered at once as failed (retried later).
                let _ = self
                    .done_tx
                    .send(failed(&job, "no delivery thread could be started".into()));
                return;
            }
        }
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            // Cannot happen while the pool holds the receiver; answer it as failed anyway.
            let _ = self
                .done_tx
                .send(failed(&job, "delivery thread gone".into()));
        }
    }

    /// The deliveries that ended since the last call.
    pub fn finished(&mut self) -> Vec<Done> {
        let done: Vec<Done> = self.done.try_iter().collect();
        for d in &done {
            if let Some(n) = self.in_flight.get_mut(&d.webhook_id) {
                *n -= 1;
                if *n <= 0 {
                    self.in_flight.remove(&d.webhook_id);
                }
            }
        }
        done
    }
}

/// Spawns a thread with every signal blocked (the mask is inherited from the spawning
/// thread, which blocks them only around the spawn).
fn spawn_without_signals<F: FnOnce() + Send + 'static>(f: F) -> std::io::Result<()> {
    // SAFETY: sigfillset/pthread_sigmask on local sets; the old mask is restored at once.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let spawned = std::thread::Builder::new()
            .name("keypal webhook".into())
            .stack_size(2 * 1024 * 1024) // name resolution (NSS) and TLS want room
            .spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        spawned.map(|_| ())
    }
}

/// A delivery thread: takes jobs until the pool is gone, keeping one HTTP agent (and its
/// kept-alive connections) per timeout and private-targets setting.
fn run(queue: &Mutex<mpsc::Receiver<Job>>, done: &mpsc::Sender<Done>) {
    let mut agents: HashMap<(Duration, bool), ureq::Agent> = HashMap::new();
    loop {
        let job = match queue.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let agent = agents
            .entry((job.timeout, job.allow_private))
            .or_insert_with(|| agent(job.timeout, job.allow_private));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| post(agent, &job)))
            .unwrap_or_else(|_| failed(&job, "delivery failed unexpectedly".into()));
        if done.send(outcome).is_err() {
            return;
        }
        // Wake the worker's thread: SIGUSR1 sets its latch (every signal is blocked on this
        // thread, so the process's own thread takes it, as PostgreSQL expects).
        // SAFETY: kill(2) on our own pid.
        unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
    }
}

fn agent(timeout: Duration, allow_private: bool) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(timeout)
        .timeout_connect(timeout)
        .redirects(0)
        .user_agent(concat!("keypal/", env!("CARGO_PKG_VERSION")))
        .resolver(move |addr: &str| resolve(addr, allow_private))
        .build()
}

/// Resolves a target, then keeps only the addresses it may reach: when private targets are
/// refused, none that is loopback, private or link-local (the connection goes to exactly
/// the addresses checked here, so a name cannot resolve differently in between).
fn resolve(addr: &str, allow_private: bool) -> std::io::Result<Vec<SocketAddr>> {
    let all: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    if allow_private {
        return Ok(all);
    }
    let public: Vec<SocketAddr> = all.iter().copied().filter(|a| is_public(a.ip())).collect();
    if public.is_empty() && !all.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refused: {} resolves only to private, loopback or link-local addresses \
                 (keypal_configure(webhook_allow_private => true) allows them)",
                addr
            ),
        ));
    }
    Ok(public)
}

fn post(agent: &ureq::Agent, job: &Job) -> Done {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let signature = webhook_signature(&job.secret, t, &job.body);
    let sent = agent
        .post(&job.url)
        .set("Content-Type", "application/json")
        .set("Keypal-Signature", &signature)
        .set("Keypal-Event-Id", &job.event_id.to_string())
        .set("Keypal-Attempt", &job.attempt.to_string())
        .send_string(&job.body);
    let response = match sent {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(e)) => return failed(job, transport_error(&e)),
    };
    let status = i32::from(response.status());
    // Read (a bounded part of) the answer, so the connection can be kept alive.
    let _ = std::io::copy(
        &mut response.into_reader().take(64 * 1024),
        &mut std::io::sink(),
    );
    Done {
        webhook_id: job.webhook_id,
        event_id: job.event_id,
        attempt: job.attempt,
        status: Some(status),
        error: (!(200..300).contains(&status)).then(|| format!("HTTP {status}")),
    }
}

/// A transport error in a few words (its kind and message; never the request's headers).
fn transport_error(e: &ureq::Transport) -> String {
    let text = e.to_string();
    let timed_out = matches!(e.kind(), ureq::ErrorKind::Io)
        && (text.contains("timed out")
            || text.contains("WouldBlock")
            || text.contains("Resource temporarily unavailable"));
    if timed_out {
        format!("timeout: {text}")
    } else {
        text
    }
}

fn failed(job: &Job, error: String) -> Done {
    Done {
        webhook_id: job.webhook_id,
        event_id: job.event_id,
        attempt: job.attempt,
        status: None,
        error: Some(error),
    }
}
