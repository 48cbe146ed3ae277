//! `ty-trainer-guard`: stands between a worker and its trainer so that a
//! worker that dies never leaves the trainer running. The worker starts it;
//! see `trainyard_core::guard` for the protocol.

fn main() {
    let args = match trainyard_core::guard::GuardArgs::parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(usage) => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{}: cannot start: {e}", trainyard_core::guard::BINARY);
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(trainyard_core::guard::run(args));
    std::process::exit(code);
}
