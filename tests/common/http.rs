//! A pooled HTTP client for tests: real sockets, keep-alive, no mocks.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The client type the tests share.
pub type TestClient = Client<HttpConnector, Empty<Bytes>>;

/// A keep-alive client.
pub fn client() -> TestClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build(connector)
}

/// GET `path` on `addr`; a transport error is `Err`.
pub async fn get(
    client: &TestClient,
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, String), String> {
    let (status, body) = get_bytes(client, addr, path).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GET `path` on `addr`, the body as bytes (`/holders` answers bytes, not
/// JSON); a transport error is `Err`.
pub async fn get_bytes(
    client: &TestClient,
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, Vec<u8>), String> {
    let uri: hyper::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let res = client.get(uri).await.map_err(|e| format!("{e:?}"))?;
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e}"))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

/// Parses a JSON body, failing the test with the body when it is not JSON.
pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// One answer with its headers.
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: hyper::HeaderMap,
    /// The body, as text.
    pub body: String,
}

/// `method path` on `addr` with extra `headers`; a transport error is `Err`.
pub async fn send(
    client: &TestClient,
    method: hyper::Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Empty::new()).map_err(|e| format!("{e}"))?;
    let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map_err(|e| format!("{e}"))?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
