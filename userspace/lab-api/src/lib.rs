//! A Kubernetes-API-compatible endpoint for the lab: the real API's JSON
//! (k8s-openapi types) for namespaces, nodes, pods, services,
//! endpointslices, deployments, replicasets and daemonsets; list, get and
//! watch; label and field selectors; server-side tables for kubectl; and
//! pod port-forward: over WebSocket (`v4.channel.k8s.io`) as kube-rs speaks
//! it, and over SPDY/3.1 as kubectl speaks it (tunneled in WebSocket, or
//! after an `Upgrade: SPDY/3.1`). Over HTTPS, with kube-apiserver's
//! authentication: client certificates from the cluster CA, static tokens,
//! anonymous. It is a test double: faithful to the API so the client code
//! has one path for the lab and for real clusters.
pub mod auth;
mod kubelet;
pub mod objects;
mod portforward;
mod portforward_spdy;
mod probe;
mod server;
pub mod spdy;
mod store;
mod tls;

pub use server::{serve, ApiConfig};
pub use tls::TlsFiles;
