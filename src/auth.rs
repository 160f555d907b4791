//! The job's token: what it is, how a client presents it, how the coordinator checks it, and
//! how a launcher hands it to the workers it starts. The coordinator, the agent and the
//! workers all take it from here, so that there is one place where it can leak.

use anyhow::Context;
use std::path::Path;
use tonic::{Request, Status};

/// A value that never appears in logs or debug output (the job token, a private key). Its
/// text is reached only through [`Secret::expose`], so that every use is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// A fresh random token (256 bits, hex).
    pub fn random() -> anyhow::Result<Secret> {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b)
            .map_err(|e| anyhow::anyhow!("no randomness for the job token: {e}"))?;
        Ok(Secret(b.iter().map(|x| format!("{x:02x}")).collect()))
    }

    /// The secret's text, for the few places that must send or derive from it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this secret, in time that does not depend on where they differ.
    fn matches(&self, given: &str) -> bool {
        given.len() == self.0.len()
            && given
                .bytes()
                .zip(self.0.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Lets a call through only with the job's token (`authorization: Bearer TOKEN`); a refusal
/// is logged with the caller's address.
pub fn check_bearer(token: &Option<Secret>, req: Request<()>) -> Result<Request<()>, Status> {
    let Some(want) = token else {
        return Ok(req);
    };
    let given = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| want.matches(g)) {
        return Ok(req);
    }
    let peer = req
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "an unknown address".into());
    tracing::warn!(%peer, "refused a call without this job's token");
    Err(Status::unauthenticated(
        "this job needs its token: pass --token-file FILE or set ALEXNET_TOKEN (a run started \
         by `alexnet launch` or `alexnet coordinator` keeps it in RUN_DIR/token, which \
         `alexnet status --run RUN_DIR` reads)",
    ))
}

/// Adds the job's token to every call (`authorization: Bearer TOKEN`).
#[derive(Clone)]
pub struct TokenInterceptor(pub Option<Secret>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            let value = format!("Bearer {}", t.0).parse().map_err(|_| {
                tonic::Status::invalid_argument("the job token is not printable ASCII")
            })?;
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

/// Hands `token` to a child process through its environment, not its command line (which
/// `ps` shows); a token file of this process's environment is not passed on.
pub fn pass_to_child(cmd: &mut std::process::Command, token: &Option<Secret>) {
    cmd.env_remove("ALEXNET_TOKEN_FILE");
    match token {
        Some(t) => cmd.env("ALEXNET_TOKEN", &t.0),
        None => cmd.env_remove("ALEXNET_TOKEN"),
    };
}

/// The job token from ALEXNET_TOKEN or a file (never from a flag: flags show in `ps`).
pub fn read_token(file: Option<&Path>) -> anyhow::Result<Option<Secret>> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        let t = text.trim();
        anyhow::ensure!(!t.is_empty(), "the token file {} is empty", path.display());
        return Ok(Some(Secret::new(t)));
    }
    Ok(std::env::var("ALEXNET_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(|t| Secret::new(t.trim())))
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(token: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        req
    }

    #[test]
    fn only_the_jobs_token_lets_a_call_through() {
        let token = Some(Secret::new("right"));
        assert!(check_bearer(&token, call(Some("right"))).is_ok());
        for wrong in [None, Some("wrong"), Some("righ"), Some("right!")] {
            let e = check_bearer(&token, call(wrong)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert!(e.message().contains("needs its token"), "{}", e.message());
        }
        // A job without a token admits every call.
        assert!(check_bearer(&None, call(None)).is_ok());
    }

    #[test]
    fn the_interceptor_sends_what_the_check_wants() {
        use tonic::service::Interceptor;
        let token = Some(Secret::new("t0ken"));
        let req = TokenInterceptor(token.clone()).call(call(None)).unwrap();
        assert!(check_bearer(&token, req).is_ok());
    }

    #[test]
    fn a_secret_never_shows_in_debug_output() {
        assert_eq!(format!("{:?}", Secret::new("hidden")), "Secret(..)");
    }
}
