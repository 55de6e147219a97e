//! HTTP/1.1 framing for the balancer's own forwarding path, and nothing
//! else: a client's request head parsed in place ([`request`]), an
//! upstream's response head and how its body is framed, with the chunked
//! scanner ([`response`]), the hop-by-hop names and `Connection` tokens
//! both sides drop ([`hop`]), and the `Date` header ([`date`]). No policy
//! (what is forwarded where, what is retried) lives here: that is
//! `crate::balancer::forward`'s; this module imports nothing of the
//! balancer's, so the fuzz targets and property tests drive it alone.

pub mod date;
pub mod hop;
pub mod request;
pub mod response;
