//! The decode agent's requests by id: their state as `Wait` reports it, a
//! bounded memory of finished ones, and the answer of a submitter that
//! waits (`Transfer`, `Transfers`). Which session a request runs on, and
//! how it is stopped, is the session table's business (`session`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use crate::agent::error::{AgentError, ErrorKind, Failure};
use crate::agent::session::Outcome;

/// Finished requests kept for a late `Wait` before the oldest are dropped.
const MAX_FINISHED: usize = 65_536;

/// The state of a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RequestState {
    /// Running.
    #[default]
    Pending,
    /// Every byte is in place.
    Done { bytes: u64, ops: u64, latency: Duration },
    /// Failed; nothing of it is in flight any more.
    Failed { kind: ErrorKind, message: String, latency: Duration },
    /// Stopped by `Cancel`, once nothing of it was in flight any more.
    Cancelled { message: String, latency: Duration },
}

impl RequestState {
    /// The final state of a transfer that ended with `outcome` after `latency`.
    pub fn ended(outcome: Outcome, latency: Duration) -> RequestState {
        match outcome {
            Ok(m) => RequestState::Done { bytes: m.bytes, ops: m.ops, latency },
            Err(f) => RequestState::failed(f, latency),
        }
    }

    pub fn failed(f: Failure, latency: Duration) -> RequestState {
        match f.kind {
            ErrorKind::Cancelled => RequestState::Cancelled { message: f.message, latency },
            kind => RequestState::Failed { kind, message: f.message, latency },
        }
    }

    pub fn is_pending(&self) -> bool {
        matches!(self, RequestState::Pending)
    }
}

/// Where a request's final state goes when its submitter waits for it
/// (`Transfer`, `Transfers`): called once, as the request finishes, and the
/// state is then not kept for `Wait` (as after a `Wait` that returned it).
pub type Answer = Box<dyn FnOnce(RequestState) + Send>;

/// A running request, held by whatever finishes it.
pub(crate) struct Running {
    tx: watch::Sender<RequestState>,
    answer: Option<Answer>,
}

/// Requests by id, with a bounded memory of finished ones.
#[derive(Debug, Default)]
pub struct Requests {
    inner: Mutex<RequestsInner>,
}

#[derive(Debug, Default)]
struct RequestsInner {
    map: HashMap<String, watch::Sender<RequestState>>,
    finished: VecDeque<String>,
}

impl Requests {
    /// Registers a new pending request; its id must not be in use.
    pub(crate) fn insert(&self, id: &str, answer: Option<Answer>) -> Result<Running, AgentError> {
        let mut g = self.inner.lock().expect("lock");
        if g.map.contains_key(id) {
            return Err(AgentError::RequestInUse(id.into()));
        }
        let (tx, _) = watch::channel(RequestState::Pending);
        g.map.insert(id.to_string(), tx.clone());
        Ok(Running { tx, answer })
    }

    /// Sets the final state: to the answer if there is one, else kept for `Wait`.
    pub(crate) fn finish(&self, id: &str, run: Running, st: RequestState) {
        let Running { tx, answer } = run;
        // A concurrent `Wait` sees the final state either way.
        tx.send_replace(st.clone());
        let mut g = self.inner.lock().expect("lock");
        match answer {
            Some(answer) => {
                g.map.remove(id);
                drop(g);
                answer(st);
            }
            None => {
                g.finished.push_back(id.to_string());
                while g.finished.len() > MAX_FINISHED {
                    if let Some(old) = g.finished.pop_front() {
                        g.map.remove(&old);
                    }
                }
            }
        }
    }

    /// Finishes a request that `submit` fails after all (its caller gets
    /// the error, not an answer): the state is kept for `Wait`.
    pub(crate) fn refuse(&self, id: &str, run: Running, st: RequestState) {
        self.finish(id, Running { answer: None, ..run }, st);
    }

    /// The state now, or `NotFound`.
    pub fn state(&self, id: &str) -> Result<RequestState, AgentError> {
        let g = self.inner.lock().expect("lock");
        let st = g.map.get(id).ok_or_else(|| AgentError::UnknownRequest(id.into()))?.borrow().clone();
        Ok(st)
    }

    /// Waits up to `timeout` for the request to leave `Pending`. A final
    /// state is returned once and then forgotten.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<RequestState, AgentError> {
        let mut rx = {
            let g = self.inner.lock().expect("lock");
            g.map.get(id).ok_or_else(|| AgentError::UnknownRequest(id.into()))?.subscribe()
        };
        let waited = match tokio::time::timeout(timeout, rx.wait_for(|s| !s.is_pending())).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        };
        let st = waited.unwrap_or_else(|| rx.borrow().clone());
        if !st.is_pending() {
            let mut g = self.inner.lock().expect("lock");
            g.map.remove(id);
            g.finished.retain(|x| x != id);
        }
        Ok(st)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("lock").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::session::Moved;

    fn done(bytes: u64) -> RequestState {
        RequestState::ended(Ok(Moved { bytes, ops: 1 }), Duration::ZERO)
    }

    #[tokio::test]
    async fn an_answered_request_is_answered_once_and_then_forgotten() {
        let r = Requests::default();
        let short = Duration::from_millis(1);
        let (tx, rx) = std::sync::mpsc::channel();
        let answer: Answer = Box::new(move |st| tx.send(st).unwrap());
        let run = r.insert("a", Some(answer)).unwrap();
        assert!(matches!(r.insert("a", None).err(), Some(AgentError::RequestInUse(_))), "the id is in use while it runs");
        assert_eq!(r.wait("a", short).await.unwrap(), RequestState::Pending);
        r.finish("a", run, done(7));
        assert_eq!(rx.try_recv().unwrap(), done(7));
        assert!(rx.try_recv().is_err(), "answered once");
        assert!(matches!(r.wait("a", short).await, Err(AgentError::UnknownRequest(_))), "its caller has it; not kept for Wait");

        // Without an answer the final state waits for a Wait, once.
        let run = r.insert("b", None).unwrap();
        r.finish("b", run, done(9));
        assert_eq!(r.wait("b", short).await.unwrap(), done(9));
        assert!(matches!(r.wait("b", short).await, Err(AgentError::UnknownRequest(_))));

        // A request submit fails after all: its caller gets the error, the
        // answer is never called, and Wait still sees the failure.
        let (tx, rx) = std::sync::mpsc::channel::<RequestState>();
        let run = r.insert("c", Some(Box::new(move |st| tx.send(st).unwrap()))).unwrap();
        r.refuse("c", run, RequestState::failed(Failure::new(ErrorKind::Unavailable, "gone"), Duration::ZERO));
        assert!(matches!(rx.try_recv(), Err(std::sync::mpsc::TryRecvError::Disconnected)), "dropped, not called");
        assert!(matches!(r.wait("c", short).await.unwrap(), RequestState::Failed { kind: ErrorKind::Unavailable, .. }));
        assert!(r.is_empty());
    }

    #[test]
    fn a_cancelled_failure_is_the_cancelled_state() {
        let st = RequestState::failed(Failure::new(ErrorKind::Cancelled, "stopped"), Duration::ZERO);
        assert_eq!(st, RequestState::Cancelled { message: "stopped".into(), latency: Duration::ZERO });
    }
}
