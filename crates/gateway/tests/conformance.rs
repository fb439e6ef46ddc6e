//! The routing conformance suite (`chat_gateway::conformance`) on in-process routing (one node,
//! nothing expires). The same suite runs against Redis, with two nodes, in
//! `tests/e2e/conformance.rs`.

use std::sync::Arc;

use chat_gateway::conformance::{self, Flavor, NodeSpec};
use chat_gateway::{LocalRouting, Routing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_routing_conforms() {
    let flavor = Flavor { multi_node: false, expires: false };
    conformance::run_all(flavor, |spec: NodeSpec| async move { Arc::new(LocalRouting::new(spec.hub)) as Arc<dyn Routing> }).await;
}
