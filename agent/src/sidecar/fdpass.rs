//! The side socket beside the local API: gRPC cannot carry a file
//! descriptor, so an engine hands its region's descriptor over this Unix
//! socket (SCM_RIGHTS) under a one-time token, then names the token in its
//! AttachRegion call.
//!
//! One message per connection: a 2-byte big-endian token length, the token
//! (1 to 256 bytes), and exactly one descriptor. The agent answers one byte,
//! 0 when it took the descriptor, else 1 and a one-line reason. Only the
//! agent's own user may connect (the socket is 0600 and the peer's
//! credentials are checked); descriptors wait at most [`TOKEN_TTL`] for
//! their AttachRegion, and at most [`MAX_WAITING`] wait at once.

use std::collections::HashMap;
use std::io::{IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// How long a descriptor waits for the AttachRegion that names its token.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Descriptors waiting for their AttachRegion at most.
pub const MAX_WAITING: usize = 8;
const MAX_TOKEN: usize = 256;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Descriptors received and not yet claimed, by token.
#[derive(Debug, Default, Clone)]
pub struct FdInbox {
    waiting: Arc<Mutex<HashMap<String, (OwnedFd, Instant)>>>,
}

impl FdInbox {
    /// Takes the descriptor sent under `token`, once.
    pub fn take(&self, token: &str) -> Option<OwnedFd> {
        let mut w = self.waiting.lock().expect("lock");
        w.retain(|_, (_, at)| at.elapsed() < TOKEN_TTL);
        w.remove(token).map(|(fd, _)| fd)
    }

    fn put(&self, token: String, fd: OwnedFd) -> Result<(), String> {
        let mut w = self.waiting.lock().expect("lock");
        w.retain(|_, (_, at)| at.elapsed() < TOKEN_TTL);
        if w.contains_key(&token) {
            return Err(format!("token {token:?} is already in use: send each descriptor under a new token"));
        }
        if w.len() >= MAX_WAITING {
            return Err(format!("{MAX_WAITING} descriptors already wait for their AttachRegion; attach them first"));
        }
        w.insert(token, (fd, Instant::now()));
        Ok(())
    }
}

/// Serves the side socket at `path` (created owner-only) until the process
/// ends, putting each received descriptor in `inbox`.
pub fn serve(path: &Path, inbox: FdInbox) -> anyhow::Result<()> {
    let listener = crate::cmd::serve::bind_owner_only(path, |p| std::os::unix::net::UnixListener::bind(p))?;
    std::thread::Builder::new().name("kvrail-fd-socket".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let answer = receive(&conn).and_then(|(token, fd)| inbox.put(token, fd));
            let reply = match &answer {
                Ok(()) => vec![0],
                Err(e) => {
                    tracing::info!(error = %e, "refused a descriptor on the side socket");
                    [&[1u8][..], e.as_bytes()].concat()
                }
            };
            let _ = conn.write_all(&reply);
        }
    })?;
    Ok(())
}

/// Reads one token and its descriptor from `conn`.
fn receive(conn: &UnixStream) -> Result<(String, OwnedFd), String> {
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let cred = rustix::net::sockopt::socket_peercred(conn).map_err(|e| format!("reading the peer's credentials: {e}"))?;
    if cred.uid != rustix::process::getuid() {
        return Err(format!("user {} may not hand this agent a region; run the engine as the agent's user", cred.uid.as_raw()));
    }
    let mut buf = [0u8; 2 + MAX_TOKEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(conn, &mut [IoSliceMut::new(&mut buf)], &mut cmsg, RecvFlags::CMSG_CLOEXEC)
        .map_err(|e| format!("reading the descriptor message: {e}"))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for msg in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    let fd = match fds.len() {
        1 => fds.pop().expect("one"),
        n => return Err(format!("the message carried {n} descriptors; send exactly one (SCM_RIGHTS)")),
    };
    let mut have = got.bytes;
    if have < 2 {
        have += read_more(conn, &mut buf[have..2])?;
    }
    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    if len == 0 || len > MAX_TOKEN {
        return Err(format!("token length {len} is out of range (1 to {MAX_TOKEN} bytes)"));
    }
    while have < 2 + len {
        have += read_more(conn, &mut buf[have..2 + len])?;
    }
    let token = std::str::from_utf8(&buf[2..2 + len]).map_err(|_| "the token is not UTF-8".to_string())?;
    Ok((token.to_string(), fd))
}

fn read_more(mut conn: &UnixStream, buf: &mut [u8]) -> Result<usize, String> {
    match conn.read(buf) {
        Ok(0) => Err("the message ended before its token did".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("reading the token: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::io::IoSlice;
    use std::os::fd::AsFd;

    fn send(path: &Path, payload: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> Vec<u8> {
        let mut conn = UnixStream::connect(path).unwrap();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(cmsg.push(SendAncillaryMessage::ScmRights(fds)));
        }
        rustix::net::sendmsg(&conn, &[IoSlice::new(payload)], &mut cmsg, SendFlags::empty()).unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).unwrap();
        answer
    }

    fn framed(token: &str) -> Vec<u8> {
        [&(token.len() as u16).to_be_bytes()[..], token.as_bytes()].concat()
    }

    #[test]
    fn a_descriptor_is_taken_once_under_its_token_and_bad_messages_are_refused() {
        let dir = std::env::temp_dir().join(format!("kvrail-fdpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fd.sock");
        let inbox = FdInbox::default();
        serve(&path, inbox.clone()).unwrap();
        let file = tempfile_with(b"region bytes");

        assert_eq!(send(&path, &framed("t1"), &[file.as_fd()]), vec![0]);
        let got = inbox.take("t1").expect("the descriptor waits under its token");
        let inode = |fd: std::os::fd::BorrowedFd<'_>| rustix::fs::fstat(fd).unwrap().st_ino;
        assert_eq!(inode(got.as_fd()), inode(file.as_fd()), "the agent holds the sender's file");
        assert!(inbox.take("t1").is_none(), "taken once");

        let refused = |answer: Vec<u8>, text: &str| {
            assert_eq!(answer.first(), Some(&1), "{answer:?}");
            let msg = String::from_utf8_lossy(&answer[1..]).to_string();
            assert!(msg.contains(text), "{msg}");
        };
        refused(send(&path, &framed("t2"), &[]), "carried 0 descriptors");
        refused(send(&path, &framed("t3"), &[file.as_fd(), file.as_fd()]), "carried 2 descriptors");
        refused(send(&path, &[0, 0], &[file.as_fd()]), "token length 0");
        assert_eq!(send(&path, &framed("t4"), &[file.as_fd()]), vec![0]);
        refused(send(&path, &framed("t4"), &[file.as_fd()]), "already in use");
        assert!(inbox.take("t2").is_none() && inbox.take("t3").is_none(), "refused messages leave nothing");
        assert!(inbox.take("t4").is_some());
        let mode = std::fs::metadata(&path).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).unwrap();
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_with(bytes: &[u8]) -> std::fs::File {
        let fd = rustix::fs::memfd_create("kvrail-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let mut f = std::fs::File::from(fd);
        f.write_all(bytes).unwrap();
        f
    }
}
