//! `yard token new`: a fresh client token and the config line that lets it
//! in. The line holds the token's SHA-256 only, so the config file can be
//! shared and printed; the token is shown once, here.

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
