//! The NRI messages doved reads and sends, package `nri.pkg.api.v1alpha1` (NRI's
//! `pkg/api/api.proto`). Only the fields doved uses are declared: protobuf skips the
//! others, and NRI only ever appends fields, so the field numbers here are the
//! interface and never change.

use prost::Message;

pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";
pub const RUNTIME_SERVICE: &str = "nri.pkg.api.v1alpha1.Runtime";

/// `Event` values; a plugin subscribes with the mask of `1 << (event - 1)`.
pub mod event {
    pub const REMOVE_POD_SANDBOX: u32 = 3;
    pub const POST_CREATE_CONTAINER: u32 = 5;
    pub const START_CONTAINER: u32 = 6;
    pub const UPDATE_CONTAINER: u32 = 8;
    pub const REMOVE_CONTAINER: u32 = 11;

    pub const fn mask(events: &[u32]) -> i32 {
        let mut mask = 0i32;
        let mut i = 0;
        while i < events.len() {
            mask |= 1 << (events[i] - 1);
            i += 1;
        }
        mask
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, Message)]
pub struct RegisterPluginRequest {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    /// Two digits: the plugin's place in the order plugins are called in.
    #[prost(string, tag = "2")]
    pub plugin_idx: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ConfigureRequest {
    #[prost(string, tag = "1")]
    pub config: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ConfigureResponse {
    /// The event mask; 0 subscribes to every event.
    #[prost(int32, tag = "2")]
    pub events: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct SynchronizeRequest {
    #[prost(message, repeated, tag = "1")]
    pub pods: Vec<PodSandbox>,
    #[prost(message, repeated, tag = "2")]
    pub containers: Vec<Container>,
    /// More requests follow (a runtime splits a large state); answer each with `more`.
    #[prost(bool, tag = "3")]
    pub more: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct SynchronizeResponse {
    #[prost(bool, tag = "2")]
    pub more: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct StateChangeEvent {
    #[prost(int32, tag = "1")]
    pub event: i32,
    #[prost(message, optional, tag = "2")]
    pub pod: Option<PodSandbox>,
    #[prost(message, optional, tag = "3")]
    pub container: Option<Container>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, tag = "3")]
    pub uid: String,
    #[prost(string, tag = "4")]
    pub namespace: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Container {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub pod_sandbox_id: String,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(int32, tag = "4")]
    pub state: i32,
    #[prost(map = "string, string", tag = "5")]
    pub labels: std::collections::HashMap<String, String>,
    #[prost(map = "string, string", tag = "6")]
    pub annotations: std::collections::HashMap<String, String>,
    #[prost(message, optional, tag = "11")]
    pub linux: Option<LinuxContainer>,
    /// The container's init process, once a task exists (0 at creation).
    #[prost(uint32, tag = "12")]
    pub pid: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct LinuxContainer {
    /// The OCI `linux.cgroupsPath`: `/a/b` (cgroupfs) or `slice:prefix:name` (systemd).
    #[prost(string, tag = "5")]
    pub cgroups_path: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `StateChangeEvent` written field by field with the numbers of NRI's api.proto,
    /// not with the types above, so a wrong tag here fails.
    #[test]
    fn a_state_change_decodes_by_nri_field_numbers() {
        fn field(tag: u32, wire: u32, body: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            prost::encoding::encode_varint(((tag << 3) | wire) as u64, &mut out);
            if wire == 2 {
                prost::encoding::encode_varint(body.len() as u64, &mut out);
            }
            out.extend_from_slice(body);
            out
        }
        let varint = |v: u64| {
            let mut out = Vec::new();
            prost::encoding::encode_varint(v, &mut out);
            out
        };
        let linux = field(5, 2, b"/kubepods/pod1/ctr1");
        let label = [
            field(1, 2, b"io.kubernetes.pod.name"),
            field(2, 2, b"web-0"),
        ]
        .concat();
        let container = [
            field(1, 2, b"ctr1"),
            field(2, 2, b"pod1"),
            field(3, 2, b"app"),
            field(4, 0, &varint(3)),
            field(5, 2, &label),
            field(11, 2, &linux),
            field(12, 0, &varint(4242)),
            // A field doved does not declare (Container.env = 8) is skipped.
            field(8, 2, b"PATH=/bin"),
        ]
        .concat();
        let pod = [
            field(1, 2, b"pod1"),
            field(2, 2, b"web-0"),
            field(4, 2, b"shop"),
        ]
        .concat();
        let bytes = [
            field(1, 0, &varint(event::START_CONTAINER as u64)),
            field(2, 2, &pod),
            field(3, 2, &container),
        ]
        .concat();
        let ev = StateChangeEvent::decode(bytes.as_slice()).unwrap();
        assert_eq!(ev.event, 6);
        let pod = ev.pod.unwrap();
        assert_eq!((pod.id.as_str(), pod.namespace.as_str()), ("pod1", "shop"));
        let c = ev.container.unwrap();
        assert_eq!(
            (c.id.as_str(), c.pod_sandbox_id.as_str(), c.pid),
            ("ctr1", "pod1", 4242)
        );
        assert_eq!(c.state, 3);
        assert_eq!(c.labels["io.kubernetes.pod.name"], "web-0");
        assert_eq!(c.linux.unwrap().cgroups_path, "/kubepods/pod1/ctr1");
    }

    #[test]
    fn the_event_mask_is_one_bit_per_event_from_bit_zero() {
        assert_eq!(
            event::mask(&[
                event::POST_CREATE_CONTAINER,
                event::START_CONTAINER,
                event::REMOVE_CONTAINER
            ]),
            0x430
        );
    }
}
