//! Errors as one line a person can act on: what failed, against which
//! address, the likely cause and the fix. gRPC and transport errors carry
//! a Debug dump of their internals in their Display; none of it reaches a
//! user. The whole chain stays available with `--log-level debug`.

use std::error::Error as StdError;
use std::io::ErrorKind;

/// `err` as one line: its contexts (outermost first), then the root cause
/// in plain words with a hint where one is known.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        if let Some(s) = cause.downcast_ref::<tonic::Status>() {
            parts.push(status_line(s));
            break;
        }
        if cause.downcast_ref::<tonic::transport::Error>().is_some() || cause.downcast_ref::<std::io::Error>().is_some() {
            parts.push(root_cause(cause));
            break;
        }
        parts.push(cause.to_string());
    }
    // anyhow repeats nothing, but a context may end with what the next
    // part says; keep the line short.
    parts.dedup();
    parts.join(": ")
}

/// A gRPC status as one line: its message (or what its code means), the
/// underlying cause if there is one, and a hint.
pub fn status_line(s: &tonic::Status) -> String {
    let msg = s.message().trim();
    let below = StdError::source(s).map(root_cause);
    let what = match (msg.is_empty(), below) {
        (true, Some(b)) => b,
        (false, Some(b)) if !generic(msg) => format!("{msg}: {b}"),
        (false, Some(b)) => b,
        (false, None) => msg.to_string(),
        (true, None) => code_words(s.code()).to_string(),
    };
    match s.code() {
        tonic::Code::Unauthenticated if !what.contains("secret") => {
            format!("{what} (do both sides share the cluster secret? KVRAIL_CLUSTER_SECRET or --cluster-secret-file)")
        }
        tonic::Code::DeadlineExceeded if !what.contains("within") => format!("{what} (the peer did not answer in time)"),
        _ => what,
    }
}

/// Messages that only restate the transport's failure; the cause below
/// says more.
fn generic(msg: &str) -> bool {
    matches!(msg, "tcp connect error" | "transport error" | "error trying to connect" | "h2 protocol error" | "connection error")
}

/// The innermost cause below `e`, in plain words, with a hint for the
/// common ones.
fn root_cause(e: &(dyn StdError + 'static)) -> String {
    let mut inner: &(dyn StdError + 'static) = e;
    let mut io: Option<&std::io::Error> = None;
    loop {
        if let Some(x) = inner.downcast_ref::<std::io::Error>() {
            io = Some(x);
        }
        match inner.source() {
            Some(next) => inner = next,
            None => break,
        }
    }
    match io {
        Some(io) => io_words(io),
        None => {
            let s = inner.to_string();
            if s.contains("invalid peer certificate") || s.contains("certificate") {
                format!("{s} (TLS: check --tls-ca, --tls-cert and the name in the certificate)")
            } else {
                s
            }
        }
    }
}

fn io_words(io: &std::io::Error) -> String {
    match io.kind() {
        ErrorKind::ConnectionRefused => "connection refused (is it running? did it exit? see its log)".into(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => {
            "the connection was closed by the other side (did it exit? see its log)".into()
        }
        ErrorKind::TimedOut => "timed out (is the address right, and the port reachable from here?)".into(),
        ErrorKind::NotFound => "no such file or socket (is the agent running with that --local-socket?)".into(),
        ErrorKind::PermissionDenied => "permission denied (the local socket is owner-only: run as its owner)".into(),
        ErrorKind::AddrInUse => "address already in use (pick another port, or port 0)".into(),
        ErrorKind::AddrNotAvailable => "address not available on this host (check the address)".into(),
        _ => {
            // "Connection refused (os error 111)" reads better without the number.
            let s = io.to_string();
            s.split(" (os error").next().unwrap_or(&s).to_string()
        }
    }
}

fn code_words(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::Unavailable => "the agent is unavailable (is it running?)",
        tonic::Code::DeadlineExceeded => "no answer in time",
        tonic::Code::Cancelled => "cancelled",
        tonic::Code::Unauthenticated => "not authenticated",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::FailedPrecondition => "refused: the agent is not in a state to do this",
        tonic::Code::Unimplemented => "the agent does not serve this call (another kvrail version?)",
        _ => "the call failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_one_line_with_its_address_and_a_hint() {
        // A port nothing listens on: bind, note, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("http://127.0.0.1:{port}");
        let err = tonic::transport::Endpoint::from_shared(addr.clone()).unwrap().connect().await.unwrap_err();
        let e = anyhow::Error::new(err).context(format!("cannot reach the decode agent at 127.0.0.1:{port}"));
        let line = one_line(&e);
        assert_eq!(
            line,
            format!("cannot reach the decode agent at 127.0.0.1:{port}: connection refused (is it running? did it exit? see its log)")
        );
        assert!(!line.contains('\n') && !line.contains("ConnectError") && !line.contains("source:"), "{line}");
    }

    #[test]
    fn a_status_reads_as_its_message() {
        let s = tonic::Status::invalid_argument("block 9 is out of range (the region has 8 blocks)");
        let e = anyhow::Error::new(s).context("submitting request r1");
        assert_eq!(one_line(&e), "submitting request r1: block 9 is out of range (the region has 8 blocks)");
        let s = tonic::Status::unauthenticated("handshake proof does not match");
        assert!(status_line(&s).contains("KVRAIL_CLUSTER_SECRET"), "{}", status_line(&s));
        assert_eq!(status_line(&tonic::Status::unavailable("")), "the agent is unavailable (is it running?)");
        // Contexts without a gRPC error pass through.
        assert_eq!(one_line(&anyhow::anyhow!("inner").context("outer")), "outer: inner");
    }
}
