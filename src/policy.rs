//! What desired state may make a root daemon do. Issue 6 loads policy files;
//! until then the built-in default from DESIGN.md applies.

/// A policy: allowed filesystem types and refused mount options.
#[derive(Debug, Clone)]
pub struct Policy {
    /// fstypes a volume may use.
    pub fstypes: Vec<String>,
    /// Options a volume may not ask for (they would let users escalate).
    pub forbidden_options: Vec<String>,
}

impl Default for Policy {
    /// DESIGN.md: fstypes cifs, nfs, nfs4, tmpfs, bind, azureblob; `suid` and `dev` refused.
    fn default() -> Self {
        Self {
            fstypes: ["cifs", "nfs", "nfs4", "tmpfs", "bind", "azureblob"]
                .map(String::from)
                .to_vec(),
            forbidden_options: ["suid", "dev"].map(String::from).to_vec(),
        }
    }
}

impl Policy {
    /// Checks a volume's fstype and options; the error is the `Rejected` reason.
    pub fn check_volume(&self, fstype: &str, options: &[String]) -> Result<(), String> {
        if !self.fstypes.iter().any(|f| f == fstype) {
            return Err(format!(
                "fstype {fstype:?} is not allowed by policy (allowed: {})",
                self.fstypes.join(", ")
            ));
        }
        for opt in options {
            let key = opt.split('=').next().unwrap_or_default();
            if self.forbidden_options.iter().any(|f| f == key) {
                return Err(format!("mount option {key:?} is not allowed by policy"));
            }
        }
        Ok(())
    }
}
