//! `yard token new`: a fresh client token and the config line that lets it
//! in. The line holds the token's SHA-256 only, so the config file can be
//! shared and printed; the token is shown once, here. And `yard secrets
//! keygen`: the fleet key file that seals jobs' secrets.

use crate::args::TokenNewArgs;
use std::process::ExitCode;
use trainyard_core::auth::{new_token, token_key};
use trainyard_proto::TenantId;

pub fn new(args: &TokenNewArgs) -> anyhow::Result<ExitCode> {
    let tenant = TenantId::parse(&args.tenant)
        .map_err(|e| anyhow::anyhow!("--tenant {:?}: {e}", args.tenant))?;
    let token = new_token();
    println!("token  {token}");
    println!();
    println!("Give the token to the tenant (TY_TOKEN or --token); add this line to");
    println!("[coordinator.tokens] (or to the TY_COORDINATOR__TOKENS table):");
    println!();
    println!("{:?} = {:?}", token_key(&token), tenant.as_str());
    Ok(ExitCode::SUCCESS)
}

/// `yard secrets keygen`: a new fleet secrets key file, or a rotated one.
pub fn keygen(args: &crate::args::KeygenArgs) -> anyhow::Result<ExitCode> {
    let id = trainyard_core::secrets::write_key_file(&args.out, args.rotate).map_err(|e| {
        anyhow::anyhow!(
            "cannot {} {}: {e}",
            if args.rotate { "rotate" } else { "write" },
            args.out.display()
        )
    })?;
    println!("key {id} written to {} (mode 0600)", args.out.display());
    println!("set [secrets] key_file on the coordinator, captioners, workers and uploaders");
    Ok(ExitCode::SUCCESS)
}
