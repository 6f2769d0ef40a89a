//! Reading a NATS `.creds` file: the user JWT and the nkey seed that signs the
//! server's nonce (pure).
//!
//! async-nats reads these files with a regular expression, which links a whole
//! regular-expression engine with its Unicode tables (about half a megabyte of an
//! 8 MB budget) for this alone; the format is simple enough to read by lines.
//! A file as `nsc` writes it:
//!
//! ```text
//! -----BEGIN NATS USER JWT-----
//! eyJ0eXAiOiJqd3QiLCJhbGciOiJlZDI1NTE5...
//! ------END NATS USER JWT------
//!
//! ************************* IMPORTANT *************************
//! NKEY Seed printed below can be used sign and prove identity.
//!
//! -----BEGIN USER NKEY SEED-----
//! SUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM
//! ------END USER NKEY SEED------
//! ```
//!
//! As async-nats reads it: a value is a line of letters, digits, `_`, `-`, `.`
//! and `=` between two fence lines (three or more dashes at each end); the first
//! such value is the JWT, the second the seed.

use nkeys::KeyPair;

/// What a `.creds` file holds.
pub struct Creds {
    pub jwt: String,
    pub key: KeyPair,
}

/// Why a file is not a `.creds` file. Never carries the seed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredsError {
    #[error("no user JWT between -----BEGIN/END----- lines")]
    NoJwt,
    #[error("no nkey seed between -----BEGIN/END----- lines after the JWT")]
    NoSeed,
    #[error("the nkey seed is not valid")]
    BadSeed,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The seed is a secret: show whose key it is, never the key.
        f.debug_struct("Creds")
            .field("public_key", &self.key.public_key())
            .finish_non_exhaustive()
    }
}

/// Reads the JWT and the seed out of a `.creds` file's text.
pub fn parse(text: &str) -> Result<Creds, CredsError> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut values = lines
        .windows(3)
        .filter(|w| is_fence(w[0]) && is_value(w[1]) && is_fence(w[2]))
        .map(|w| w[1]);
    let jwt = values.next().ok_or(CredsError::NoJwt)?;
    let seed = values.next().ok_or(CredsError::NoSeed)?;
    let key = KeyPair::from_seed(seed).map_err(|_| CredsError::BadSeed)?;
    Ok(Creds {
        jwt: jwt.to_string(),
        key,
    })
}

fn is_fence(line: &str) -> bool {
    line.len() >= 6 && line.starts_with("---") && line.ends_with("---")
}

fn is_value(line: &str) -> bool {
    !line.is_empty()
        && line
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '='))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The seed is the published example of async-nats' documentation, not a
    // secret; the JWT only has to look like one (it is not checked here).
    const SEED: &str = "SUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM";
    const JWT: &str = "eyJ0eXAiOiJqd3QiLCJhbGciOiJlZDI1NTE5In0.eyJqdGkiOiJUVlNNTEtTWkJBN01VWDNYQUxNUVQzTjRISUw1UkZGQU9YNUtaUFhEU0oyWlAzNkVMNVJBIiwiaWF0IjoxNTU4MDQ1NTYyLCJpc3MiOiJBQlZTQk0zVTQ1REdZRVVFQ0tYUVM3QkVOSFdHN0tGUVVEUlRFSEFKQVNPUlBWV0JaNEhPSUtDSCIsIm5hbWUiOiJvbWVnYSIsInN1YiI6IlVEWEIyVk1MWFBBU0FKN1pEVEtZTlE3UU9DRldTR0I0Rk9NWVFRMjVIUVdTQUY3WkFKRTZQOVZQIiwidHlwZSI6InVzZXIiLCJuYXRzIjp7InB1YiI6e30sInN1YiI6e319fQ.6TQ2ilCDb6m2ZDiJuj_D_OePGXFyN3Ap2DEm3ipcU5AhrWrNvneJryWrpgi_yuVWKo1UoD5s8bxlmwypWVGFAA";

    fn nsc_file(jwt: &str, seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        )
    }

    #[test]
    fn a_file_as_nsc_writes_it_gives_its_jwt_and_the_key_of_its_seed() {
        let creds = parse(&nsc_file(JWT, SEED)).expect("a valid creds file");
        assert_eq!(creds.jwt, JWT);
        let expected = KeyPair::from_seed(SEED).expect("the example seed is valid");
        assert_eq!(creds.key.public_key(), expected.public_key());
    }

    #[test]
    fn windows_line_ends_and_indentation_are_read_too() {
        let text = nsc_file(JWT, SEED)
            .lines()
            .map(|l| format!("  {l}\r\n"))
            .collect::<String>();
        assert_eq!(parse(&text).expect("valid").jwt, JWT);
    }

    #[test]
    fn a_file_without_both_blocks_or_with_a_bad_seed_is_refused() {
        assert_eq!(parse("").unwrap_err(), CredsError::NoJwt);
        assert_eq!(parse(JWT).unwrap_err(), CredsError::NoJwt);
        let jwt_only = "-----BEGIN NATS USER JWT-----\nabc\n------END NATS USER JWT------\n";
        assert_eq!(parse(jwt_only).unwrap_err(), CredsError::NoSeed);
        assert_eq!(
            parse(&nsc_file(JWT, "SUNOTASEED")).unwrap_err(),
            CredsError::BadSeed
        );
    }

    #[test]
    fn the_seed_never_shows_in_debug_output() {
        let creds = parse(&nsc_file(JWT, SEED)).expect("valid");
        assert!(!format!("{creds:?}").contains(SEED));
    }
}
