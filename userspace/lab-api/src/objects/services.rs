//! The services, their endpoint slices, and the service range
//! (ServiceCIDR).
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use tpbpf_lab::{spec, Status};

use super::{labels, meta, uid};

pub fn services() -> Vec<Service> {
    spec::services()
        .into_iter()
        .map(|s| Service {
            metadata: meta(
                s.name,
                Some(s.namespace),
                &uid("Service", s.namespace, s.name),
            ),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                cluster_ip: Some(s.cluster_ip.into()),
                cluster_ips: Some(vec![s.cluster_ip.into()]),
                selector: Some(labels(&[("app", s.selector)])),
                ports: Some(
                    s.ports
                        .iter()
                        .map(|(port, proto)| ServicePort {
                            name: Some(spec::port_name(*port, proto).into()),
                            port: i32::from(*port),
                            protocol: Some(proto.to_uppercase()),
                            // By the container port's name, as charts do.
                            target_port: Some(IntOrString::String(
                                spec::port_name(*port, proto).into(),
                            )),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

pub fn endpoint_slices(live: &Status) -> Vec<EndpointSlice> {
    spec::services()
        .into_iter()
        .map(|s| {
            let name = format!("{}-abcde", s.name);
            EndpointSlice {
                metadata: ObjectMeta {
                    labels: Some(labels(&[("kubernetes.io/service-name", s.name)])),
                    ..meta(
                        &name,
                        Some(s.namespace),
                        &uid("EndpointSlice", s.namespace, &name),
                    )
                },
                address_type: "IPv4".into(),
                endpoints: spec::endpoints(&s, &live.pod_specs)
                    .into_iter()
                    .map(|p| Endpoint {
                        addresses: vec![p.ip.clone()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            ..Default::default()
                        }),
                        node_name: Some(p.node.into()),
                        ..Default::default()
                    })
                    .collect(),
                ports: Some(
                    s.ports
                        .iter()
                        .map(|(port, proto)| EndpointPort {
                            name: Some(spec::port_name(*port, proto).into()),
                            port: Some(i32::from(*port)),
                            protocol: Some(proto.to_uppercase()),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }
        })
        .collect()
}

/// The ServiceCIDR API (networking.k8s.io/v1, Kubernetes 1.33): how clients
/// discover the service range.
pub fn service_cidrs() -> Vec<k8s_openapi::api::networking::v1::ServiceCIDR> {
    use k8s_openapi::api::networking::v1::{ServiceCIDR, ServiceCIDRSpec};
    vec![ServiceCIDR {
        metadata: meta("kubernetes", None, &uid("ServiceCIDR", "", "kubernetes")),
        spec: Some(ServiceCIDRSpec {
            cidrs: Some(vec![spec::SERVICE_CIDR.into()]),
        }),
        status: None,
    }]
}
