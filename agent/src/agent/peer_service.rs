//! The `kvrail.v1.Peer` gRPC service: handshake, the session stream and
//! stats, served by every agent (a prefill agent refuses handshakes).

use std::pin::Pin;
use std::sync::Arc;

use kvrail_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{decode, Agent};

/// Orders queued for one prefill agent before back-pressure refuses more.
const SESSION_QUEUE: usize = 4096;

#[derive(Debug, Clone)]
pub struct PeerService {
    pub agent: Arc<Agent>,
}

type DownStream = Pin<Box<dyn Stream<Item = Result<pb::SessionDown, Status>> + Send>>;

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn challenge(&self, _req: Request<pb::ChallengeRequest>) -> Result<Response<pb::ChallengeResponse>, Status> {
        Ok(Response::new(pb::ChallengeResponse { nonce: self.agent.nonces.issue(), auth_required: self.agent.cfg.secret.is_some() }))
    }

    async fn handshake(&self, req: Request<pb::HandshakeRequest>) -> Result<Response<pb::HandshakeResponse>, Status> {
        decode::handshake(&self.agent, req.into_inner()).await.map(Response::new)
    }

    type SessionStream = DownStream;

    async fn session(&self, req: Request<Streaming<pb::SessionUp>>) -> Result<Response<DownStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("session stream closed before SessionOpen"))?;
        let Some(pb::session_up::Msg::Open(open)) = first.msg else {
            return Err(Status::invalid_argument("the first message of a session must be SessionOpen"));
        };
        let session = self
            .agent
            .sessions
            .lock()
            .expect("lock")
            .get(&open.session_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no session {:?}; handshake first", open.session_id)))?;
        // The prefill agent opens its session once its handshake is over:
        // the time to fault in our view of its region (sm).
        self.agent.engine.prefault(session.engine_peer).await.map_err(|e| super::convert::status_of(&e))?;
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        session.attach(tx);
        if !self.agent.sessions.lock().expect("lock").contains_key(&session.id) {
            // Dropped meanwhile (its lease ran out before the stream opened).
            session.close("session dropped before its stream opened");
            return Err(Status::not_found(format!("session {:?} was dropped before its stream opened; handshake again", open.session_id)));
        }
        let agent = self.agent.clone();
        let lease = agent.cfg.lease;
        let beat = {
            let session = session.clone();
            tokio::spawn(async move {
                let mut t = tokio::time::interval(lease / 5);
                loop {
                    t.tick().await;
                    if session.send(pb::session_down::Msg::Heartbeat(super::heartbeat())).is_err() {
                        break;
                    }
                }
            })
        };
        tokio::spawn(async move {
            let why = loop {
                match tokio::time::timeout(lease, inbound.message()).await {
                    Ok(Ok(Some(pb::SessionUp { msg: Some(pb::session_up::Msg::Completion(c)) }))) => session.complete(c),
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) => break "the prefill agent closed its session".to_string(),
                    Ok(Err(e)) => break format!("the session with the prefill agent broke: {}", e.message()),
                    Err(_) => break format!("nothing heard from the prefill agent for {lease:?}: its lease expired"),
                };
            };
            beat.abort();
            tracing::warn!(peer = %session.peer_agent, session = %session.id, reason = %why, "session ended");
            session.close(&why);
            let removed = agent.sessions.lock().expect("lock").remove(&session.id).is_some();
            if removed {
                let _ = agent.engine.disconnect(session.engine_peer).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        Ok(Response::new(self.agent.stats()))
    }
}
