//! `POST /purchases`: several purchases from a balancer in one request
//! (the frames of [`crate::protocol::batch`]), each answered exactly as it
//! would be alone, all at once.
//!
//! A purchase costs a node more in its own request than in the sale: the
//! kernel's work for two messages and hyper's for one request (8.4 µs of
//! the ~15 a purchase costs, measured on the sold-out path). A balancer
//! with many buyers in flight to one node sends those that arrive while
//! its last batch is out as one request, so the two messages are shared.
//! Each item goes through the same route, checks and store call as a
//! purchase alone ([`super::purchase_route`]), and its answer is the same
//! HTTP/1.1 response, so the balancer relays it as it would the node's.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use super::reply::{Answer, fixed};
use crate::node::sales::Sales;
use crate::protocol::batch;

/// Headers in one item at most: hyper's limit for a request alone.
const MAX_HEADERS: usize = 100;

/// Serves a batch: its items' answers in its items' order.
pub async fn serve(sales: &Sales, req: Request<Incoming>) -> Answer {
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_none_or(|n| n > batch::MAX_BYTES) {
        return fixed(
            StatusCode::PAYLOAD_TOO_LARGE,
            b"{\"status\":\"payload_too_large\",\"reason\":\"a batch has a Content-Length of at most 4 MiB\"}\n",
        );
    }
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return fixed(
            StatusCode::BAD_REQUEST,
            b"{\"status\":\"bad_request\",\"reason\":\"the batch's body was cut off\"}\n",
        );
    };
    let Some(frames) = batch::items(&body, batch::MAX_ITEMS) else {
        return fixed(
            StatusCode::BAD_REQUEST,
            b"{\"status\":\"bad_request\",\"reason\":\"not a batch: frames of a 4-byte length and an HTTP/1.1 request, at most 64\"}\n",
        );
    };
    let requests: Vec<Result<Request<()>, Refusal>> = frames.iter().map(|f| item(f)).collect();
    let mut pending: Vec<Pin<Box<dyn Future<Output = Answer> + Send + '_>>> = requests
        .iter()
        .map(|r| -> Pin<Box<dyn Future<Output = Answer> + Send + '_>> {
            match r {
                Ok(req) => Box::pin(async move {
                    match super::purchase_route(sales, req).await {
                        Some(answer) => answer,
                        None => fixed(
                            StatusCode::BAD_REQUEST,
                            b"{\"status\":\"bad_request\",\"reason\":\"only purchases go in a batch\"}\n",
                        ),
                    }
                }),
                Err((status, body)) => {
                    let refused = fixed(*status, body);
                    Box::pin(async move { refused })
                }
            }
        })
        .collect();
    let answers = all(&mut pending).await;
    drop(pending);
    let mut out = Vec::with_capacity(answers.len() * 256);
    let mut one = Vec::with_capacity(512);
    for answer in answers {
        one.clear();
        write_response(&mut one, answer).await;
        batch::push(&mut out, &one);
    }
    hyper::Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
        .body(http_body_util::Full::new(Bytes::from(out)))
        .unwrap_or_else(|_| fixed(StatusCode::INTERNAL_SERVER_ERROR, b"{}\n"))
}

/// The answer an item gets without being tried: its status and body.
type Refusal = (StatusCode, &'static [u8]);

/// One item's request head, or why it is not tried.
fn item(frame: &[u8]) -> Result<Request<()>, Refusal> {
    let malformed = || {
        (
            StatusCode::BAD_REQUEST,
            &b"{\"status\":\"bad_request\",\"reason\":\"a malformed request in a batch\"}\n"[..],
        )
    };
    if frame.len() > batch::MAX_ITEM_BYTES {
        return Err((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            b"{\"status\":\"header_too_large\",\"reason\":\"a request in a batch is over 96 KiB\"}\n",
        ));
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    match head.parse(frame) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                b"{\"status\":\"header_too_large\",\"reason\":\"more than 100 header lines\"}\n",
            ));
        }
        _ => return Err(malformed()),
    }
    let target = head.path.unwrap_or("/");
    if target.len() > super::MAX_URI_LEN {
        return Err((
            StatusCode::URI_TOO_LONG,
            b"{\"status\":\"uri_too_long\",\"reason\":\"the request target is longer than 8 KiB\"}\n",
        ));
    }
    let mut req = Request::builder()
        .method(head.method.unwrap_or("GET"))
        .uri(target);
    for h in head.headers.iter() {
        req = req.header(h.name, h.value);
    }
    req.body(()).map_err(|_| malformed())
}

/// Every future's output, in their order, polled together.
async fn all<'a>(pending: &mut [Pin<Box<dyn Future<Output = Answer> + Send + 'a>>]) -> Vec<Answer> {
    let mut done: Vec<Option<Answer>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (f, d) in pending.iter_mut().zip(done.iter_mut()) {
            if d.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(answer) => *d = Some(answer),
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

/// `answer` as the HTTP/1.1 response hyper would write for it alone
/// (without `date`, which the balancer adds).
async fn write_response(out: &mut Vec<u8>, answer: Answer) {
    let (parts, body) = answer.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == hyper::header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&body);
}
