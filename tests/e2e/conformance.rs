//! The conformance suite of every boundary against its real service: the event log on Kafka,
//! the tables on Cassandra, routing on Redis (two nodes). The same suites run against the
//! embedded back-ends inside each crate (`cargo test -p chat-events -p chat-store -p chat-gateway`),
//! so the back-ends cannot drift. Each test works in names of its own (topic prefix, keyspace,
//! Redis key prefix).

use std::sync::Arc;

use chat_events::kafka::{KafkaConfig, KafkaLog};
use chat_events::EventLog;
use chat_gateway::conformance::{Flavor, NodeSpec};
use chat_gateway::{RedisRouting, Routing};
use chat_store::{ScyllaConfig, ScyllaStore, Tables};

use crate::harness::{cluster_available, services};

/// Eight random hex digits, to keep this run's names apart from every other run's.
fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_event_log_on_kafka() {
    if !cluster_available("conformance_event_log_on_kafka") {
        return;
    }
    let log: Arc<dyn EventLog> = Arc::new(KafkaLog::new(KafkaConfig::new(&services().kafka)).expect("kafka client"));
    chat_events::conformance::run_all(log, &format!("conf.{}.", tag())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_tables_on_cassandra() {
    if !cluster_available("conformance_tables_on_cassandra") {
        return;
    }
    let config = ScyllaConfig { nodes: vec![services().cassandra], keyspace: format!("conf_{}", tag()), replication_factor: 1 };
    let store = ScyllaStore::connect(&config).await.unwrap_or_else(|e| panic!("connect to Cassandra, keyspace {}: {e}", config.keyspace));
    let tables: Arc<dyn Tables> = Arc::new(store);
    chat_store::conformance::run_all(tables).await;
    // Every table costs Cassandra heap: leave nothing behind.
    ScyllaStore::drop_keyspaces(&config.nodes, &config.keyspace).await.expect("drop keyspace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_routing_on_redis() {
    if !cluster_available("conformance_routing_on_redis") {
        return;
    }
    let url = services().redis;
    let prefix = format!("conf:{}:", tag());
    let flavor = Flavor { multi_node: true, expires: true };
    chat_gateway::conformance::run_all(flavor, |spec: NodeSpec| {
        let (url, prefix) = (url.clone(), prefix.clone());
        async move {
            let routing = RedisRouting::connect(&url, &prefix, &spec.node, spec.ttl, spec.hub)
                .await
                .unwrap_or_else(|e| panic!("connect to Redis at {url}: {e}"));
            Arc::new(routing) as Arc<dyn Routing>
        }
    })
    .await;
}
