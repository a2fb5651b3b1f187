//! `/v1/cluster/*`: status, digest, shards, admit, remove.

use super::parse::{parse_group, parse_peer};
use super::{ApiError, ApiState};
use crate::cluster::node_id;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use canal_consensus::{GroupId, Op};
use canal_proto::api::{ClusterShards, ClusterStatus, GroupStatus, MemberReport, StateDigest};
use std::collections::HashMap;

pub(super) async fn cluster_status(
    State(st): State<ApiState>,
) -> Result<axum::Json<ClusterStatus>, ApiError> {
    let mut groups = Vec::new();
    for g in st.consensus.groups() {
        let members = st
            .consensus
            .status(g)
            .await?
            .into_iter()
            .map(|(id, r)| match r {
                Ok(s) => MemberReport {
                    node_id: id,
                    status: Some(s),
                    error: None,
                },
                Err(e) => MemberReport {
                    node_id: id,
                    status: None,
                    error: Some(e),
                },
            })
            .collect();
        groups.push(GroupStatus {
            group: g.to_string(),
            members,
        });
    }
    Ok(axum::Json(ClusterStatus {
        node_id: st.consensus.node_id(),
        groups,
        unrouted: unrouted(&st),
    }))
}

/// Why this node cannot route every topic yet: no shard map read, or shard groups of its
/// shards in the map not open here.
fn unrouted(st: &ApiState) -> Option<String> {
    if let Err(e) = st.consensus.route() {
        return Some(e.to_string());
    }
    let map = crate::shard_map::committed(&st.consensus)?;
    let me = st.dht.local_peer_id().to_base58();
    let hosted: std::collections::BTreeSet<GroupId> = st.consensus.groups().into_iter().collect();
    let missing: Vec<u32> = (0..map.shards)
        .filter(|&s| {
            map.replicas(s).contains(&me)
                && !hosted.contains(&canal_consensus::routing::shard_group(s))
        })
        .collect();
    let first = missing.first()?;
    Some(format!(
        "{} of this node's shard groups are not open here yet (shard {first} first)",
        missing.len()
    ))
}

/// The shard map in this node's replica of the metadata group, every shard with the group
/// that serves its topics today and that group's leader as this node knows it.
pub(super) async fn cluster_shards(State(st): State<ApiState>) -> axum::Json<ClusterShards> {
    let c = &st.consensus;
    let leader_of = |g: GroupId| {
        let s = c.local_status(g).ok()?;
        let id = s.leader?;
        Some(
            s.nodes
                .iter()
                .find(|(n, _)| *n == id)
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| format!("node {id}")),
        )
    };
    let mut view = crate::shard_map::view(
        crate::shard_map::committed(c).as_ref(),
        crate::shard_map::previous(c).as_ref(),
        &leader_of,
    );
    for row in &mut view.rows {
        row.shard_group = Some(crate::shard_groups::status(c, row.shard));
    }
    axum::Json(view)
}

pub(super) async fn cluster_digest(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<StateDigest>, ApiError> {
    let g = parse_group(q.get("group"), canal_consensus::routing::DEFAULT_GROUP)?;
    let sm = st.consensus.state_machine(g)?;
    let internal = |e: openraft_error::E| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    };
    Ok(axum::Json(StateDigest {
        group: g.to_string(),
        digest: sm.digest().map_err(internal)?,
        applied_index: sm.applied().map_err(internal)?.map(|l| l.index),
        keys: sm.key_count().map_err(internal)?,
    }))
}

/// The storage error type of the state machine, named once.
mod openraft_error {
    pub(super) type E = canal_consensus::ReadError;
}

/// Records that a peer may join (meshes without a cluster key admit nobody on their own);
/// the membership job of the metadata leader adds it as a learner once it is seen.
pub(super) async fn cluster_admit(
    State(st): State<ApiState>,
    Path(peer): Path<String>,
) -> Result<StatusCode, ApiError> {
    let peer = parse_peer(&peer)?;
    st.consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: canal_consensus::InternalKey::Admitted(peer.to_base58()),
                value: Some(b"admitted".to_vec()),
            },
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn cluster_remove(
    State(st): State<ApiState>,
    Path(peer): Path<String>,
) -> Result<StatusCode, ApiError> {
    let peer = parse_peer(&peer)?;
    let id = node_id(&peer);
    // First the tombstone, so the membership job never adds the peer back as a learner.
    st.consensus
        .write_op(
            GroupId::METADATA,
            Op::Internal {
                key: canal_consensus::InternalKey::Removed(peer.to_base58()),
                value: Some(b"removed".to_vec()),
            },
        )
        .await?;
    // Shard groups are left to the map: the next map leaves the removed peer out, and the
    // shard groups job moves its replicas elsewhere one step at a time.
    let groups = st.consensus.groups().into_iter();
    for g in groups.filter(|g| canal_consensus::routing::shard_of_group(*g).is_none()) {
        st.consensus.remove(g, id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}
