//! The `kvrail.v1.Control` service: the local API an engine worker (or
//! kvrail's own demo, bench and soak drivers) calls on its agent.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kvrail_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::error::AgentError;
use super::{convert, decode, Agent};
use crate::pattern;

/// Longest `Wait` a caller may ask for.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// Requests of one `Transfers` stream between the agent reading their
/// submit and its caller taking their answer; the agent reads no further
/// submits from the stream until one is taken.
const STREAM_IN_FLIGHT: usize = 1024;

type Answers = Pin<Box<dyn Stream<Item = Result<pb::WaitResponse, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct ControlService {
    pub agent: Arc<Agent>,
}

impl ControlService {
    fn require_patterns(&self) -> Result<(), Status> {
        if self.agent.cfg.test_patterns {
            Ok(())
        } else {
            Err(Status::failed_precondition("test patterns write into the KV region; start the agent with --test-patterns to allow them"))
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("worker task failed: {e}")))?
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn info(&self, _req: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        // Peers that can take orders: handshaked and with their session stream open.
        let peers = self.agent.open_peers();
        Ok(Response::new(pb::InfoResponse {
            agent: Some(self.agent.info()),
            ucx_library: self.agent.ucx.library.clone(),
            peers,
            listen: self.agent.cfg.listen.to_string(),
        }))
    }

    async fn submit(&self, req: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        Ok(Response::new(decode::submit(&self.agent, req.into_inner(), None).await?))
    }

    async fn wait(&self, req: Request<pb::WaitRequest>) -> Result<Response<pb::WaitResponse>, Status> {
        let req = req.into_inner();
        super::validate::check_id("request_id", &req.request_id)?;
        let timeout = Duration::from_millis(req.timeout_ms as u64).min(MAX_WAIT);
        let st = self.agent.decode()?.requests.wait(&req.request_id, timeout).await?;
        Ok(Response::new(convert::wait_response(req.request_id, st)))
    }

    async fn transfer(&self, req: Request<pb::SubmitRequest>) -> Result<Response<pb::WaitResponse>, Status> {
        let (done, rx) = oneshot::channel();
        let answer: decode::Answer = Box::new(move |st| {
            let _ = done.send(st);
        });
        let id = decode::submit(&self.agent, req.into_inner(), Some(answer)).await?.request_id;
        let st = rx.await.map_err(|_| Status::internal(format!("request {id:?} ended without a final state")))?;
        Ok(Response::new(convert::wait_response(id, st)))
    }

    type TransfersStream = Answers;

    async fn transfers(&self, req: Request<Streaming<pb::SubmitRequest>>) -> Result<Response<Answers>, Status> {
        let mut inbound = req.into_inner();
        // A slot is taken before a submit is read and given back as its
        // answer leaves: a caller that stops reading answers stops its own
        // submits, and the answers queued here stay bounded.
        let slots = Arc::new(Semaphore::new(STREAM_IN_FLIGHT));
        let (tx, rx) = mpsc::unbounded_channel();
        let agent = self.agent.clone();
        let taken = slots.clone();
        tokio::spawn(async move {
            loop {
                // A caller that went away returns no more slots.
                let slot = tokio::select! {
                    slot = taken.acquire() => slot,
                    () = tx.closed() => break,
                };
                let Ok(slot) = slot else { break };
                slot.forget();
                let req = match inbound.message().await {
                    Ok(Some(req)) => req,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "Transfers stream ended by its caller");
                        break;
                    }
                };
                let (id, answers) = (req.request_id.clone(), tx.clone());
                let answer: decode::Answer = Box::new(move |st| {
                    let _ = answers.send(convert::wait_response(id, st));
                });
                // A request that must dial its peer first waits in a task of
                // its own: the stream's other peers go on meanwhile.
                let dials = agent.decode().is_ok() && !decode::dial::ready(&agent, &req.peer, &req.peer_address);
                let (id, tx) = (req.request_id.clone(), tx.clone());
                let submit = {
                    let agent = agent.clone();
                    async move {
                        if let Err(e) = decode::submit(&agent, req, Some(answer)).await {
                            let _ = tx.send(convert::refused(id, &e));
                        }
                    }
                };
                if dials {
                    tokio::spawn(submit);
                } else {
                    submit.await;
                }
            }
        });
        let out = UnboundedReceiverStream::new(rx).map(move |answer| {
            slots.add_permits(1);
            Ok(answer)
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let req = req.into_inner();
        super::validate::check_id("request_id", &req.request_id)?;
        let state = decode::cancel(&self.agent, &req.request_id)?;
        Ok(Response::new(pb::CancelResponse { state: convert::request_state_to_pb(&state) as i32 }))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        Ok(Response::new(self.agent.stats()))
    }

    async fn fill_pattern(&self, req: Request<pb::FillPatternRequest>) -> Result<Response<pb::FillPatternResponse>, Status> {
        self.require_patterns()?;
        let (agent, seed) = (self.agent.clone(), req.into_inner().seed);
        let bytes = blocking(move || pattern::fill(agent.engine.region(), &agent.layout, seed).map_err(transfer_status)).await?;
        Ok(Response::new(pb::FillPatternResponse { blocks: self.agent.layout.num_blocks() as u64, bytes }))
    }

    async fn poison_blocks(&self, req: Request<pb::PoisonBlocksRequest>) -> Result<Response<pb::PoisonBlocksResponse>, Status> {
        self.require_patterns()?;
        let blocks = req.into_inner().blocks;
        check_blocks(&self.agent, &blocks)?;
        let agent = self.agent.clone();
        blocking(move || pattern::poison(agent.engine.region(), &agent.layout, &blocks).map_err(transfer_status)).await?;
        Ok(Response::new(pb::PoisonBlocksResponse {}))
    }

    async fn verify_pattern(&self, req: Request<pb::VerifyPatternRequest>) -> Result<Response<pb::VerifyPatternResponse>, Status> {
        let req = req.into_inner();
        if req.src_blocks.len() != req.dst_blocks.len() {
            return Err(Status::invalid_argument(format!("{} src_blocks but {} dst_blocks", req.src_blocks.len(), req.dst_blocks.len())));
        }
        check_blocks(&self.agent, &req.dst_blocks)?;
        let agent = self.agent.clone();
        let v = blocking(move || {
            pattern::verify(agent.engine.region(), &agent.layout, req.seed, &req.src_blocks, &req.dst_blocks).map_err(transfer_status)
        })
        .await?;
        Ok(Response::new(pb::VerifyPatternResponse {
            verified_blocks: v.verified,
            bad_blocks: v.bad,
            first_error: v.first_error,
            checksum: v.checksum,
        }))
    }
}

fn transfer_status(e: kvrail_transfer::TransferError) -> Status {
    AgentError::from(e).into()
}

fn check_blocks(agent: &Agent, blocks: &[u32]) -> Result<(), Status> {
    if blocks.len() > kvrail_transfer::plan::MAX_BLOCKS_PER_REQUEST {
        return Err(Status::invalid_argument(format!(
            "{} blocks in one call; the limit is {}",
            blocks.len(),
            kvrail_transfer::plan::MAX_BLOCKS_PER_REQUEST
        )));
    }
    if let Some((i, b)) = blocks.iter().enumerate().find(|(_, &b)| b >= agent.layout.num_blocks()) {
        return Err(Status::invalid_argument(format!(
            "blocks[{i}] = {b} is out of range: this agent has blocks 0..{}",
            agent.layout.num_blocks()
        )));
    }
    Ok(())
}
