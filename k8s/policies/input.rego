# The input document (policies/README.md, version 1) as the other modules see it.
#
# Every section is read through a rule that is always defined ({} or "" when a
# piece is absent or of the wrong type), so a missing piece becomes a deny
# reason, never an undefined decision. `pod`, `csr` and `cert_key` are the
# exceptions: they are undefined when null, which switches off the checks that
# need them (POD_NOT_FOUND stands in for the pod's; a request without a CSR is
# legitimate, and one with no key at all has no key to judge).
package identityd

import rego.v1

default req := {}

req := input.request if is_object(input.request)

default attrs := {}

attrs := req.attributes if is_object(req.attributes)

default tok := {}

tok := input.token if is_object(input.token)

default cfg := {}

cfg := input.config if is_object(input.config)

default facts := {}

facts := input.facts if is_object(input.facts)

pod := input.pod if is_object(input.pod)

csr := input.csr if is_object(input.csr)

# The key the certificate will carry: the CSR's, else ZTS's csrPublicKey.
cert_key := input.key if is_object(input.key)

# obj[key] when it is a string, else "". Callers pass a defined obj: an
# undefined argument would make the whole expression (and its rule) undefined.
str(obj, key) := value if {
	value := obj[key]
	is_string(value)
} else := ""

# obj[key] when it is an array of strings, else [].
str_list(obj, key) := value if {
	value := obj[key]
	is_string_list(value)
} else := []

is_string_list(value) if {
	is_array(value)
	every item in value {
		is_string(item)
	}
}

as_set(list) := {item | some item in list}

# What the policy needs from the host; anything else missing shows up as a
# mismatch with a named code. One rule per requirement, each reading its field
# directly (object.get on an always-defined section, never a call on an absent
# field inside `not`): cheaper in regopy than walking a table of paths.
input_problems contains "version is not 1" if object.get(input, "version", null) != 1

input_problems contains "kind is not instance or refresh" if not known_kind

known_kind if input.kind in {"instance", "refresh"}

input_problems contains "request is not an object" if not is_object(object.get(input, "request", null))

input_problems contains "token is not an object" if not is_object(object.get(input, "token", null))

input_problems contains "config is not an object" if not is_object(object.get(input, "config", null))

input_problems contains "facts is not an object" if not is_object(object.get(input, "facts", null))

# Required non-empty strings: str() is "" when absent, empty or not a string.
input_problems contains "token.namespace is missing or empty" if token_namespace == ""

input_problems contains "token.service_account is missing or empty" if token_service_account == ""

input_problems contains "token.pod.uid is missing or empty" if token_pod_uid == ""

input_problems contains "token.pod.name is missing or empty" if token_pod_name == ""

input_problems contains "config.provider is missing or empty" if str(cfg, "provider") == ""

input_problems contains "config.trust_domain is missing or empty" if str(cfg, "trust_domain") == ""

input_problems contains "config.cert_usage is missing or empty" if str(cfg, "cert_usage") == ""

# Required types.
input_problems contains "config.dns_suffixes is not a string list" if {
	not is_string_list(object.get(cfg, "dns_suffixes", null))
}

input_problems contains "config.allowed_ec_curves is not a string list" if {
	not is_string_list(object.get(cfg, "allowed_ec_curves", null))
}

input_problems contains "config.cert_expiry_minutes is not a number" if {
	not is_number(object.get(cfg, "cert_expiry_minutes", null))
}

input_problems contains "config.cert_expiry_minutes is not positive" if {
	is_number(cfg.cert_expiry_minutes)
	cfg.cert_expiry_minutes <= 0
}

input_problems contains "config.min_rsa_bits is not a number" if not is_number(object.get(cfg, "min_rsa_bits", null))

input_problems contains "config.allow_refresh is not a boolean" if not is_boolean(object.get(cfg, "allow_refresh", null))

input_problems contains "facts.client_ip is not a string" if not is_string(object.get(facts, "client_ip", null))

input_problems contains "facts.client_ip_valid is not a boolean" if {
	not is_boolean(object.get(facts, "client_ip_valid", null))
}

input_problems contains "facts.san_ips is not a string list" if not is_string_list(object.get(facts, "san_ips", null))

input_problems contains "facts.san_ips_invalid is not a string list" if {
	not is_string_list(object.get(facts, "san_ips_invalid", null))
}

input_problems contains "facts.csr_ips_invalid is not a string list" if {
	not is_string_list(object.get(facts, "csr_ips_invalid", null))
}

# Required when the section is present (pod and csr may be null).
input_problems contains "pod.ips is not a string list" if {
	pod
	not is_string_list(object.get(pod, "ips", null))
}

input_problems contains concat("", ["csr.", field, " is not a string list"]) if {
	csr
	some field in ["dns", "ips", "uris", "other_sans"]
	not is_string_list(object.get(csr, field, null))
}

# The key section is an object or null, and an object whenever a CSR is sent (it
# is the CSR's key then): a host or policy set out of step cannot switch the key
# checks off by leaving it out.
input_problems contains "key is not an object or null" if {
	value := input.key
	not is_null(value)
	not is_object(value)
}

input_problems contains "key is missing while a CSR is sent" if {
	csr
	not cert_key
}

# Absent means none; present, they must be maps.
input_problems contains "pod.labels is not a map" if {
	value := pod.labels
	not is_object(value)
}

input_problems contains "pod.annotations is not a map" if {
	value := pod.annotations
	not is_object(value)
}

input_problems contains concat("", ["request.attributes.", name, " is not a string list"]) if {
	some name in ["sanDNS", "sanIP", "sanURI"]
	value := attrs[name]
	not is_string_list(value)
}

violations contains concat("", ["POLICY_INPUT_INVALID: ", problem]) if {
	some problem in input_problems
}
