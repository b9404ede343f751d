//! The `kvrail.v1.Peer` gRPC service: challenge, handshake, the session
//! streams and stats, served by every agent: a decode agent admits prefill
//! agents that dial it (then `Session`), a prefill agent decode agents that
//! dial it (then `Serve`). A gRPC edge: it speaks `tonic::Status`, the
//! agent below it speaks `AgentError`.

use std::pin::Pin;
use std::sync::Arc;

use kvrail_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{decode, prefill, Agent, Side};

#[derive(Debug, Clone)]
pub struct PeerService {
    pub agent: Arc<Agent>,
}

type DownStream = Pin<Box<dyn Stream<Item = Result<pb::SessionDown, Status>> + Send>>;
type UpStream = Pin<Box<dyn Stream<Item = Result<pb::SessionUp, Status>> + Send>>;

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn challenge(&self, _req: Request<pb::ChallengeRequest>) -> Result<Response<pb::ChallengeResponse>, Status> {
        Ok(Response::new(pb::ChallengeResponse {
            nonce: self.agent.nonces.issue(),
            auth_required: self.agent.cfg.secret.is_some(),
            agent_id: self.agent.cfg.agent_id.clone(),
        }))
    }

    async fn handshake(&self, req: Request<pb::HandshakeRequest>) -> Result<Response<pb::HandshakeResponse>, Status> {
        let req = req.into_inner();
        let resp = match &self.agent.side {
            Side::Decode(_) => decode::handshake(&self.agent, req).await?,
            Side::Prefill(_) => prefill::accept(&self.agent, req).await?,
        };
        Ok(Response::new(resp))
    }

    type SessionStream = DownStream;

    async fn session(&self, req: Request<Streaming<pb::SessionUp>>) -> Result<Response<DownStream>, Status> {
        let mut inbound = req.into_inner();
        let session_id = opened(&mut inbound, "Session", |m| match m.msg {
            Some(pb::session_up::Msg::Open(open)) => Some(open.session_id),
            _ => None,
        })
        .await?;
        let rx = decode::stream::open(&self.agent, &session_id, inbound).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ServeStream = UpStream;

    async fn serve(&self, req: Request<Streaming<pb::SessionDown>>) -> Result<Response<UpStream>, Status> {
        let mut inbound = req.into_inner();
        let session_id = opened(&mut inbound, "Serve", |m| match m.msg {
            Some(pb::session_down::Msg::Open(open)) => Some(open.session_id),
            _ => None,
        })
        .await?;
        let up = prefill::serve(&self.agent, &session_id, inbound).await?;
        Ok(Response::new(Box::pin(up)))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        Ok(Response::new(self.agent.stats()))
    }
}

/// The session id of a session stream's first message, which must be a
/// SessionOpen (`open` finds it in a message of the stream's kind).
async fn opened<T>(inbound: &mut Streaming<T>, rpc: &str, open: impl FnOnce(T) -> Option<String>) -> Result<String, Status> {
    let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument(format!("{rpc} stream closed before SessionOpen")))?;
    open(first).ok_or_else(|| Status::invalid_argument(format!("the first message of a {rpc} stream must be SessionOpen")))
}
