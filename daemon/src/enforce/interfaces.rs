//! The host-side ends of the veth pairs that lead into a container's network namespace,
//! found through rtnetlink without entering the namespace (doved keeps no capability
//! that `setns` would need): the kernel names the namespace of a veth's peer by an ID
//! local to ours (`IFLA_LINK_NETNSID`), and `RTM_GETNSID` gives the ID of a process's
//! namespace by its pid.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("rtnetlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("rtnetlink: {0}")]
    Protocol(String),
}

/// A host-side interface whose peer lives in another network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
}

/// Host-side veth ends whose peers are in the network namespace of process `pid`. Empty
/// when the process shares the host's namespace, has no veth (macvlan, ipvlan, no
/// network), or is gone.
pub fn host_veths_of(pid: u32) -> Result<Vec<Interface>, InterfaceError> {
    let socket = connect()?;
    // The dump first: it assigns IDs to the peer namespaces it reports, so the lookup
    // after it finds the container's.
    let links = request(
        &socket,
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        NLM_F_DUMP,
    )?;
    let mut by_pid = NsidMessage::default();
    by_pid.attributes.push(NsidAttribute::Pid(pid));
    let nsid = match request(&socket, RouteNetlinkMessage::GetNsId(by_pid), 0) {
        Ok(replies) => replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNsId(n) => n.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                _ => None,
            }),
            _ => None,
        }),
        // ESRCH: the process is gone.
        Err(InterfaceError::Io(e)) if e.raw_os_error() == Some(libc::ESRCH) => None,
        Err(e) => return Err(e),
    };
    let Some(nsid) = nsid else {
        return Ok(Vec::new());
    };
    Ok(links
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => veth_into(link, nsid),
            _ => None,
        })
        .collect())
}

fn veth_into(link: &LinkMessage, nsid: i32) -> Option<Interface> {
    let mut name = None;
    let (mut veth, mut peer_ns) = (false, None);
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkNetNsId(id) => peer_ns = Some(*id),
            LinkAttribute::LinkInfo(infos) => {
                veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
            }
            _ => {}
        }
    }
    (veth && peer_ns == Some(nsid)).then(|| Interface {
        index: link.header.index,
        name: name.unwrap_or_default(),
    })
}

fn connect() -> Result<Socket, InterfaceError> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Send one request and collect its replies (a dump's parts up to its end).
fn request(
    socket: &Socket,
    message: RouteNetlinkMessage,
    flags: u16,
) -> Result<Vec<RouteNetlinkMessage>, InterfaceError> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut replies = Vec::new();
    let dump = flags & NLM_F_DUMP != 0;
    loop {
        let (data, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < data.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                .map_err(|e| InterfaceError::Protocol(e.to_string()))?;
            let length = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(replies),
                        Some(code) => Err(std::io::Error::from_raw_os_error(-code.get()).into()),
                    }
                }
                NetlinkPayload::InnerMessage(inner) => {
                    replies.push(inner);
                    if !dump {
                        return Ok(replies);
                    }
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// doved's own process shares the host's namespace: no veth leads into it.
    #[test]
    fn the_hosts_own_namespace_has_no_host_side_veth() {
        let found = host_veths_of(std::process::id()).unwrap();
        assert!(found.is_empty(), "{found:?}");
    }
}
