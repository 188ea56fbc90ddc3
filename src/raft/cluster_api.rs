//! `ClusterService`: the operator's view of the cluster and membership
//! changes. Status answers for the node asked; AddMember and RemoveMember
//! run on the leader (the server wraps this service in
//! [`Forward`](super::forward::Forward)).

use tonic::{Request, Response, Status};

use super::node::Node;
use crate::proto::cluster_service_server::ClusterService;
use crate::proto::{
    AddMemberRequest, ClusterStatusRequest, ClusterStatusResponse, MembershipResponse,
    RemoveMemberRequest,
};

/// The cluster API of one node.
#[derive(Clone)]
pub struct ClusterApi {
    node: Node,
}

impl ClusterApi {
    /// Serves `node`.
    pub fn new(node: Node) -> Self {
        ClusterApi { node }
    }

    fn membership(&self) -> MembershipResponse {
        let (voters, learners) = self.node.membership();
        MembershipResponse { voters, learners }
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(self.node.status()))
    }

    #[tracing::instrument(name = "AddMember", skip_all, fields(node = request.get_ref().node_id))]
    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let r = request.into_inner();
        if r.node_id == 0 {
            return Err(Status::invalid_argument("node_id must be above 0"));
        }
        if !(r.address.starts_with("http://") || r.address.starts_with("https://")) {
            return Err(Status::invalid_argument(
                "address must be a URL such as http://10.0.0.4:7420",
            ));
        }
        self.node
            .add_member(r.node_id, r.address)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(self.membership()))
    }

    #[tracing::instrument(name = "RemoveMember", skip_all, fields(node = request.get_ref().node_id))]
    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let r = request.into_inner();
        self.node
            .remove_member(r.node_id)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(self.membership()))
    }
}

/// The leader's address as the first of `servers` that answers sees it
/// (`None` when none answers or none knows a leader). For clients that want
/// to skip the follower's forwarding hop.
pub async fn find_leader<'a>(servers: impl IntoIterator<Item = &'a str>) -> Option<String> {
    use crate::proto::cluster_service_client::ClusterServiceClient;
    for server in servers {
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(server.to_owned()) else {
            continue;
        };
        let endpoint = endpoint
            .connect_timeout(std::time::Duration::from_millis(500))
            .timeout(std::time::Duration::from_secs(1));
        let Ok(channel) = endpoint.connect().await else {
            continue;
        };
        let status = ClusterServiceClient::new(channel)
            .status(ClusterStatusRequest {})
            .await;
        if let Ok(s) = status {
            let s = s.into_inner();
            if !s.leader_address.is_empty() {
                return Some(s.leader_address);
            }
        }
    }
    None
}
