//! `${VAR}` and `${VAR:-default}` substitution from the environment.

/// Replaces every `${NAME}` in `text` with `lookup(NAME)`. `${NAME:-fallback}` uses
/// the fallback when the variable is unset or empty, and `$$` writes one `$`.
/// Returns the name of the first variable that is unset and has no fallback, or a
/// description of a malformed reference.
pub fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut output = String::with_capacity(text.len());
    let mut rest = text;

    while let Some(dollar) = rest.find('$') {
        output.push_str(&rest[..dollar]);
        rest = &rest[dollar..];

        if let Some(after) = rest.strip_prefix("$$") {
            output.push('$');
            rest = after;
            continue;
        }
        let Some(after_brace) = rest.strip_prefix("${") else {
            output.push('$');
            rest = &rest[1..];
            continue;
        };
        let Some(close) = after_brace.find('}') else {
            return Err(format!("unclosed \"${{\" in {text:?}"));
        };

        let reference = &after_brace[..close];
        let (name, fallback) = match reference.split_once(":-") {
            Some((name, fallback)) => (name, Some(fallback)),
            None => (reference, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid variable name {name:?} in \"${{{reference}}}\""));
        }

        match (lookup(name).filter(|value| !value.is_empty()), fallback) {
            (Some(value), _) => output.push_str(&value),
            (None, Some(fallback)) => output.push_str(fallback),
            (None, None) => return Err(format!("environment variable {name} is not set or is empty")),
        }
        rest = &after_brace[close + 1..];
    }

    output.push_str(rest);
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("whsec_abc".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_variables() {
        assert_eq!(expand("${SECRET}", &lookup).unwrap(), "whsec_abc");
        assert_eq!(expand("a-${SECRET}-b", &lookup).unwrap(), "a-whsec_abc-b");
        assert_eq!(expand("${MISSING:-5432}", &lookup).unwrap(), "5432");
        assert_eq!(expand("${EMPTY:-x}", &lookup).unwrap(), "x");
        assert_eq!(expand("cost $$5 and $x", &lookup).unwrap(), "cost $5 and $x");
    }

    #[test]
    fn reports_unset_and_malformed_references() {
        assert_eq!(
            expand("${MISSING}", &lookup).unwrap_err(),
            "environment variable MISSING is not set or is empty"
        );
        assert!(expand("${SECRET", &lookup).unwrap_err().contains("unclosed"));
        assert!(
            expand("${BAD NAME}", &lookup)
                .unwrap_err()
                .contains("invalid variable name")
        );
    }
}
