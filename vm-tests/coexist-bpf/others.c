// SPDX-License-Identifier: Apache-2.0
//
// Stand-ins for the eBPF that a node or a laptop already runs next to tpbpf
// (Cilium, Calico, a service mesh, a firewall), for the coexistence tests in
// ../tests/coexist.rs. Each program has a small config array the test sets
// and a stats array the test reads, so its effect and its place in the
// kernel's run order are observable:
//
//  - socket_lb (cgroup/connect4): a socket load balancer as Cilium's: a
//    connect to the service address (a ClusterIP) is rewritten to a backend
//    pod's address. It records the destination it was handed, which tells
//    whether another program (tpbpf) rewrote it first.
//  - other_lookup (sk_lookup): another proxy in a pod's network namespace
//    that assigns new connections for a port to a socket of its own (with or
//    without BPF_SK_LOOKUP_F_REPLACE), or drops them; it records whether a
//    program before it had already selected a socket.
//  - other_tc (tc / tcx ingress): counts packets and returns the verdict it
//    is given (TC_ACT_UNSPEC, i.e. TCX_NEXT: "go on", or TC_ACT_OK).
//
// Built by ../build.rs with clang (-target bpf) against libbpf-dev's headers.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ARRAY_U32(name, n)                                                     \
	struct {                                                               \
		__uint(type, BPF_MAP_TYPE_ARRAY);                              \
		__uint(max_entries, n);                                        \
		__type(key, __u32);                                            \
		__type(value, __u32);                                          \
	} name SEC(".maps")

static __always_inline __u32 get(void *map, __u32 index)
{
	__u32 *v = bpf_map_lookup_elem(map, &index);
	return v ? *v : 0;
}

static __always_inline void set(void *map, __u32 index, __u32 value)
{
	__u32 *v = bpf_map_lookup_elem(map, &index);
	if (v)
		*v = value;
}

static __always_inline void bump(void *map, __u32 index)
{
	__u32 *v = bpf_map_lookup_elem(map, &index);
	if (v)
		__sync_fetch_and_add(v, 1);
}

// ---- socket load balancer (cgroup/connect4) ----

// lb_config: the service and its backend. Addresses in network order,
// ports in host order.
enum { LB_VIP, LB_VPORT, LB_BACKEND, LB_BPORT };
ARRAY_U32(lb_config, 4);
// lb_stats: calls, rewrites, and the destination the last call was handed.
enum { LB_CALLS, LB_REWRITES, LB_LAST_IP, LB_LAST_PORT };
ARRAY_U32(lb_stats, 4);

SEC("cgroup/connect4")
int socket_lb(struct bpf_sock_addr *ctx)
{
	__u32 ip = ctx->user_ip4;
	__u32 port = bpf_ntohs(ctx->user_port);

	bump(&lb_stats, LB_CALLS);
	set(&lb_stats, LB_LAST_IP, ip);
	set(&lb_stats, LB_LAST_PORT, port);
	if (ip == get(&lb_config, LB_VIP) && port == get(&lb_config, LB_VPORT)) {
		ctx->user_ip4 = get(&lb_config, LB_BACKEND);
		ctx->user_port = bpf_htons(get(&lb_config, LB_BPORT));
		bump(&lb_stats, LB_REWRITES);
	}
	return 1;
}

// ---- another sk_lookup program ----

enum { LOOKUP_OFF, LOOKUP_ASSIGN, LOOKUP_REPLACE, LOOKUP_DROP };
// lookup_config: the local port it acts on (host order) and its mode.
enum { LK_PORT, LK_MODE };
ARRAY_U32(lookup_config, 2);
// lookup_stats: lookups for its port, how many already had a socket
// selected by an earlier program, its own assignments, failed assignments
// and the last error (negated).
enum { LK_RUNS, LK_SAW_SELECTED, LK_ASSIGNED, LK_ASSIGN_FAILED, LK_LAST_ERR };
ARRAY_U32(lookup_stats, 5);

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} lookup_socks SEC(".maps");

SEC("sk_lookup")
int other_lookup(struct bpf_sk_lookup *ctx)
{
	__u32 zero = 0, mode;
	struct bpf_sock *sk;
	long err;

	if (ctx->protocol != IPPROTO_TCP ||
	    ctx->local_port != get(&lookup_config, LK_PORT))
		return SK_PASS;
	mode = get(&lookup_config, LK_MODE);
	if (mode == LOOKUP_OFF)
		return SK_PASS;
	bump(&lookup_stats, LK_RUNS);
	if (ctx->sk)
		bump(&lookup_stats, LK_SAW_SELECTED);
	if (mode == LOOKUP_DROP)
		return SK_DROP;
	sk = bpf_map_lookup_elem(&lookup_socks, &zero);
	if (!sk)
		return SK_PASS;
	err = bpf_sk_assign(ctx, sk,
			    mode == LOOKUP_REPLACE ? BPF_SK_LOOKUP_F_REPLACE : 0);
	bpf_sk_release(sk);
	if (err) {
		bump(&lookup_stats, LK_ASSIGN_FAILED);
		set(&lookup_stats, LK_LAST_ERR, (__u32)-err);
	} else {
		bump(&lookup_stats, LK_ASSIGNED);
	}
	return SK_PASS;
}

// ---- another tc / tcx ingress program ----

// tc_config: the verdict to return (as a u32: 0xffffffff is
// TC_ACT_UNSPEC / TCX_NEXT) and an IPv4 destination to count (network order).
enum { TC_VERDICT, TC_WATCH_DST };
ARRAY_U32(tc_config, 2);
// tc_stats: all packets, and IPv4 packets to the watched destination.
enum { TC_PACKETS, TC_WATCHED };
ARRAY_U32(tc_stats, 2);

SEC("classifier")
int other_tc(struct __sk_buff *skb)
{
	__u32 daddr;

	bump(&tc_stats, TC_PACKETS);
	if (skb->protocol == bpf_htons(ETH_P_IP) &&
	    bpf_skb_load_bytes(skb, ETH_HLEN + 16, &daddr, sizeof(daddr)) == 0 &&
	    daddr == get(&tc_config, TC_WATCH_DST))
		bump(&tc_stats, TC_WATCHED);
	return (int)get(&tc_config, TC_VERDICT);
}

char LICENSE[] SEC("license") = "GPL";
