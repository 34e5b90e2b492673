//! The wire layer against a real containerd: connect to its NRI socket, register, and
//! answer `Configure` and `Synchronize`. Runs when `DOVE_TEST_NRI_SOCKET` names the
//! socket of a containerd with NRI enabled (see the note for how to start one
//! from Debian's package); otherwise it says so and returns.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;

use super::api::{event, ConfigureRequest, ConfigureResponse, Empty, RegisterPluginRequest};
use tokio::sync::mpsc;

/// A method answered by a function of the request's bytes.
struct Raw<F>(F);

#[async_trait::async_trait]
impl<F: Fn(&[u8]) -> Vec<u8> + Send + Sync> ttrpc::r#async::MethodHandler for Raw<F> {
    async fn handler(
        &self,
        _ctx: ttrpc::r#async::TtrpcContext,
        req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        let mut response = ttrpc::Response::new();
        response.set_status(ttrpc::get_status(ttrpc::Code::OK, ""));
        response.payload = (self.0)(&req.payload);
        Ok(response)
    }
}

#[tokio::test]
async fn registers_with_a_real_containerd_and_is_configured() {
    let Some(path) = std::env::var_os("DOVE_TEST_NRI_SOCKET") else {
        eprintln!("SKIPPED: DOVE_TEST_NRI_SOCKET names no containerd NRI socket");
        return;
    };
    let socket = tokio::net::UnixStream::connect(path).await.unwrap();
    let (plugin, runtime) = super::mux::split(socket);

    let (configured_tx, mut configured) = mpsc::unbounded_channel();
    let mut methods: HashMap<String, Box<dyn ttrpc::r#async::MethodHandler + Send + Sync>> =
        HashMap::new();
    let configured_tx = Arc::new(configured_tx);
    methods.insert(
        "Configure".into(),
        Box::new(Raw(move |bytes: &[u8]| {
            let _ = configured_tx.send(ConfigureRequest::decode(bytes).unwrap());
            ConfigureResponse {
                events: event::mask(&[
                    event::POST_CREATE_CONTAINER,
                    event::START_CONTAINER,
                    event::REMOVE_CONTAINER,
                ]),
            }
            .encode_to_vec()
        })),
    );
    let (synchronized_tx, mut synchronized) = mpsc::unbounded_channel();
    methods.insert(
        "Synchronize".into(),
        Box::new(Raw(move |_: &[u8]| {
            let _ = synchronized_tx.send(());
            // SynchronizeResponse with no updates: the same bytes as an empty message.
            Empty {}.encode_to_vec()
        })),
    );
    methods.insert(
        "StateChange".into(),
        Box::new(Raw(|_: &[u8]| Empty {}.encode_to_vec())),
    );
    let service = ttrpc::r#async::Service {
        methods,
        streams: HashMap::new(),
    };
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(ttrpc::r#async::transport::Listener::new(
            futures_util::stream::iter([Ok::<_, std::io::Error>(plugin)]),
        ))
        .register_service(HashMap::from([(
            super::api::PLUGIN_SERVICE.to_owned(),
            service,
        )]));
    server.start().await.unwrap();

    let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(runtime));
    let mut request = ttrpc::Request::new();
    request.service = super::api::RUNTIME_SERVICE.into();
    request.method = "RegisterPlugin".into();
    request.timeout_nano = 2_000_000_000;
    request.payload = RegisterPluginRequest {
        plugin_name: "dove".into(),
        plugin_idx: "50".into(),
    }
    .encode_to_vec();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status().code(), ttrpc::Code::OK, "{response:?}");
    let configure = tokio::time::timeout(std::time::Duration::from_secs(5), configured.recv())
        .await
        .expect("containerd configures a registered plugin")
        .unwrap();
    eprintln!(
        "configured by {} {}",
        configure.runtime_name, configure.runtime_version
    );
    assert!(!configure.runtime_name.is_empty());
    tokio::time::timeout(std::time::Duration::from_secs(5), synchronized.recv())
        .await
        .expect("containerd synchronizes a configured plugin")
        .unwrap();
}
