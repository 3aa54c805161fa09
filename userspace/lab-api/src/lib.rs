//! A Kubernetes-API-compatible endpoint for the lab: the real API's JSON
//! (k8s-openapi types) for namespaces, nodes, pods, services,
//! endpointslices, deployments, replicasets and daemonsets; list, get and
//! watch; label and field selectors; server-side tables for kubectl; and
//! pod port-forward over WebSocket (`v4.channel.k8s.io`) as kube-rs and
//! recent kubectl speak it. It is a test double: faithful to the API so the
//! client code has one path for the lab and for real clusters.
pub mod objects;
mod portforward;
mod server;

pub use server::{serve, ApiConfig};

pub use tpbpf_lab::kubeconfig;
