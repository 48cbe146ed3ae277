//! A TCP proxy on loopback that a test can cut: the routes between the
//! nodes of a test cluster pass through one of these per direction, so a
//! partition is a [`Proxy::cut`] (open connections dropped, new ones closed
//! at once) and healing it a [`Proxy::heal`].

use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

/// A cuttable forwarder from `127.0.0.1:<port>` to a target; stops on drop.
pub struct Proxy {
    pub port: u16,
    cut: watch::Sender<bool>,
    _stop: DropGuard,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let (cut, cut_rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((inbound, _)) = accepted else { continue };
                if *cut_rx.borrow() {
                    drop(inbound);
                    continue;
                }
                let (mut cut_rx, token) = (cut_rx.clone(), token.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut inbound, mut outbound) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            cut,
            _stop: stop.drop_guard(),
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}
