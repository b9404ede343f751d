//! The `kvrail.v1.Peer` gRPC service: challenge, handshake, the session
//! stream and stats, served by every agent (a prefill agent refuses
//! handshakes). A gRPC edge: it speaks `tonic::Status`, the agent below it
//! speaks `AgentError`.

use std::pin::Pin;
use std::sync::Arc;

use kvrail_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::error::AgentError;
use super::{decode, Agent};

#[derive(Debug, Clone)]
pub struct PeerService {
    pub agent: Arc<Agent>,
}

type DownStream = Pin<Box<dyn Stream<Item = Result<pb::SessionDown, Status>> + Send>>;

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn challenge(&self, _req: Request<pb::ChallengeRequest>) -> Result<Response<pb::ChallengeResponse>, Status> {
        let d = self
            .agent
            .decode()
            .map_err(|_| AgentError::WrongRole { actual: "prefill", hint: "prefill agents handshake with a decode agent" })?;
        Ok(Response::new(pb::ChallengeResponse { nonce: d.nonces.issue(), auth_required: self.agent.cfg.secret.is_some() }))
    }

    async fn handshake(&self, req: Request<pb::HandshakeRequest>) -> Result<Response<pb::HandshakeResponse>, Status> {
        Ok(Response::new(decode::handshake(&self.agent, req.into_inner()).await?))
    }

    type SessionStream = DownStream;

    async fn session(&self, req: Request<Streaming<pb::SessionUp>>) -> Result<Response<DownStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("session stream closed before SessionOpen"))?;
        let Some(pb::session_up::Msg::Open(open)) = first.msg else {
            return Err(Status::invalid_argument("the first message of a session must be SessionOpen"));
        };
        let rx = decode::stream::open(&self.agent, &open.session_id, inbound).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        Ok(Response::new(self.agent.stats()))
    }
}
