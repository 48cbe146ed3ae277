//! Finding, installing and running a local nats-server (filled in by the CLI work).
