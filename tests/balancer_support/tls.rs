//! TLS for the balancer tests: certificates made with `openssl` (EC
//! P-256, signed by a throwaway CA), the config lines that turn TLS on,
//! and clients over rustls (HTTP/1.1 bytes, or hyper's HTTP/2) that trust
//! that CA.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::common::redis::TestPki;

/// The name the default certificate is for (clients connect to
/// 127.0.0.1 and ask for it by SNI).
pub const SHOP: &str = "shop.test";
/// The name of the second certificate, picked by SNI.
pub const API: &str = "api.test";

/// A CA, a default certificate for [`SHOP`] and one for [`API`].
pub struct Certs {
    /// The files (removed on drop).
    pub pki: TestPki,
}

impl Certs {
    /// Makes them.
    pub fn new() -> Certs {
        let pki = TestPki::new();
        pki.issue("shop", "/CN=shop.test", "subjectAltName=DNS:shop.test");
        pki.issue("api", "/CN=api.test", "subjectAltName=DNS:api.test");
        Certs { pki }
    }

    /// The `[balancer]` lines: `shop` by default, `api` for its name.
    pub fn balancer_lines(&self) -> String {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            self.pki.file("shop.crt"),
            self.pki.file("shop.key")
        )
    }

    /// The `[[balancer.tls_sni]]` table for `api` (after the balancer's
    /// keys, as TOML wants tables last).
    pub fn sni_table(&self) -> String {
        format!(
            "\n[[balancer.tls_sni]]\nnames = [\"{API}\"]\ncert = \"{}\"\nkey = \"{}\"\n",
            self.pki.file("api.crt"),
            self.pki.file("api.key")
        )
    }

    /// What follows a `[balancer]`'s own keys for TLS in front of one
    /// upstream: the TLS keys, the upstream, the SNI table.
    pub fn with_upstream(&self, backend: SocketAddr) -> String {
        format!(
            "{}\n[[balancer.upstream]]\naddr = \"{backend}\"\n{}",
            self.balancer_lines(),
            self.sni_table()
        )
    }

    /// A rustls client that trusts the CA and offers `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(self.pki.file("ca.crt")).expect("ca");
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.expect("ca pem")).expect("ca root");
        }
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }

    /// A TLS connection to `to`, asking for `name`, offering `alpn`.
    pub async fn connect(
        &self,
        to: SocketAddr,
        name: &str,
        alpn: &[&[u8]],
    ) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(to).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let name = ServerName::try_from(name.to_string()).expect("name");
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(self.client(alpn)).connect(name, tcp),
        )
        .await
        .expect("handshake in time")
        .expect("handshake")
    }

    /// An HTTP/2 connection to `to` (ALPN `h2`).
    pub async fn h2(&self, to: SocketAddr) -> http2::SendRequest<Full<Bytes>> {
        let tls = self.connect(to, SHOP, &[b"h2"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        sender
    }
}

/// One request on an HTTP/2 connection: status and body.
pub async fn h2_send(
    sender: &mut http2::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> (u16, String) {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("https://{SHOP}{path}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req
        .body(Full::new(Bytes::from_static(body)))
        .expect("request");
    sender.ready().await.expect("h2 ready");
    let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Writes `bytes` on `s`, half-closes when `close` says so, and reads
/// until the server closes (at most 10 s); returns everything read.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    bytes: &[u8],
    close: bool,
) -> String {
    s.write_all(bytes).await.expect("write");
    s.flush().await.expect("flush");
    if close {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A client connection, over TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How a test reaches the balancer: plain TCP, or TLS (the balancer then
/// has `tls_cert`), so that one test body runs both ways.
pub enum Transport {
    /// HTTP/1.1 over TCP.
    Plain,
    /// HTTP/1.1 over TLS (ALPN `http/1.1`), with these certificates.
    Tls(Certs),
}

impl Transport {
    /// TLS with fresh certificates.
    pub fn tls() -> Transport {
        Transport::Tls(Certs::new())
    }

    /// `text` (a config with a `[balancer]`) with TLS turned on when this
    /// transport is TLS.
    pub fn config(&self, text: &str) -> String {
        match self {
            Transport::Plain => text.to_string(),
            Transport::Tls(c) => text.replacen(
                "[balancer]\n",
                &format!("[balancer]\n{}", c.balancer_lines()),
                1,
            ),
        }
    }

    /// A balancer from `text`, with TLS when this transport is TLS.
    pub async fn start(&self, text: &str) -> super::Running {
        super::Running::start(&self.config(text)).await
    }

    /// A new connection to `to`.
    pub async fn open(&self, to: SocketAddr) -> Box<dyn Io> {
        match self {
            Transport::Plain => {
                let s = TcpStream::connect(to).await.expect("connect");
                s.set_nodelay(true).expect("nodelay");
                Box::new(s)
            }
            Transport::Tls(c) => Box::new(c.connect(to, SHOP, &[b"http/1.1"]).await),
        }
    }

    /// Sends `bytes` on a new connection, half-closing after them when
    /// `close` says so, and reads until the balancer closes (at most 10 s).
    pub async fn send_raw(&self, to: SocketAddr, bytes: &[u8], close: bool) -> String {
        exchange(self.open(to).await, bytes, close).await
    }

    /// [`Transport::send_raw`] without the half-close: for requests that
    /// say `Connection: close`.
    pub async fn raw(&self, to: SocketAddr, bytes: &[u8]) -> String {
        self.send_raw(to, bytes, false).await
    }
}

impl Transport {
    /// Whether these connections are TLS ones (served by the balancer's own
    /// HTTP/1 path as plain ones are, since ALPN `http/1.1`).
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// GET `path` on a new connection with a real client (hyper's): status
    /// and the decoded body.
    pub async fn get(&self, to: SocketAddr, path: &str) -> Result<(u16, String), String> {
        let io = TokioIo::new(self.open(to).await);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", SHOP)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// `openssl s_client` to `addr` with `args`, sending `input`; its output.
pub fn s_client(addr: SocketAddr, args: &[&str], input: &str) -> String {
    let mut child = Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args)
        // With a request to send: read the answer to the server's close,
        // not only to the end of the input.
        .args(if input.is_empty() {
            &[][..]
        } else {
            &["-ign_eof"][..]
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl must be installed (run scripts/test.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("s_client");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The subject's CN and serial of the certificate `name` gets from `addr`.
pub fn served_certificate(addr: SocketAddr, name: &str) -> String {
    let shown = s_client(addr, &["-servername", name, "-showcerts"], "");
    let pem_start = shown
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let pem_end = shown.find("-----END CERTIFICATE-----").expect("its end") + 25;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    x509.stdin
        .take()
        .expect("stdin")
        .write_all(&shown.as_bytes()[pem_start..pem_end])
        .expect("write");
    let out = x509.wait_with_output().expect("x509");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `curl --http2` (HTTPS, trusting `certs`' CA, asking for [`SHOP`]) to
/// `path` on `addr` with `method`: curl's `"HTTP-VERSION STATUS"` (`"2
/// 200"`) and the body.
pub fn curl_h2(certs: &Certs, addr: SocketAddr, method: &str, path: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "--http2",
            "--cacert",
            &certs.pki.file("ca.crt"),
            "-X",
            method,
        ])
        .arg("--resolve")
        .arg(format!("{SHOP}:{}:127.0.0.1", addr.port()))
        .args(["-w", "\n%{http_version} %{http_code}"])
        .arg(format!("https://{SHOP}:{}{path}", addr.port()))
        .output()
        .expect("curl must be installed (run scripts/test.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (status.to_string(), body.to_string())
}

/// What a proxy in front of one backend named `backend`, given `certs` as
/// spike's `tls_cert` and `tls_sni`, must serve on `addr`: HTTP/2 by ALPN
/// (`curl --http2`), the [`API`] certificate for its name and the default
/// one for [`SHOP`]. Blocking (it runs `curl` and `openssl`).
pub fn serves_https_as_spike_does(certs: &Certs, addr: SocketAddr, backend: &str) {
    let (status, body) = curl_h2(certs, addr, "GET", "/");
    assert_eq!((status.as_str(), body.as_str()), ("2 200", backend));
    let api = served_certificate(addr, API);
    assert!(api.contains("CN = api.test"), "{api}");
    let shop = served_certificate(addr, SHOP);
    assert!(shop.contains("CN = shop.test"), "{shop}");
}
