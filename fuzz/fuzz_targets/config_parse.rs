//! Arbitrary text as the cluster config: `config::parse` returns Ok or Err, never panics; a config
//! it accepts yields placement, warnings and the Raft config without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = kvstore::config::parse(text) else {
        return;
    };
    let _ = config.warnings();
    let _ = kvstore::node::raft_config(&config);
    let _ = (
        config.heartbeat_interval(),
        config.failure_timeout(),
        config.raft_heartbeat(),
        config.election_timeout(),
        config.request_timeout(),
    );
    let ids = config.node_ids();
    let placement =
        kvstore::placement::Placement::new(&ids, config.shards, config.replication_factor);
    for shard in 0..config.shards.min(64) {
        let replicas = placement.replicas(shard);
        assert_eq!(replicas.len(), config.replication_factor);
        assert!(replicas.contains(&placement.preferred_leader(shard)));
    }
    for id in ids {
        let _ = placement.shards_of(id);
        assert!(config.node(id).is_some());
    }
    let _ = placement.shard_for_key(data);
});
