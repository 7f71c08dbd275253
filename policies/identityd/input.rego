# The input document (policies/README.md, version 1) as the other modules see it.
#
# Every section is read through a rule that is always defined ({} or "" when a
# piece is absent or of the wrong type), so a missing piece becomes a deny
# reason, never an undefined decision. `pod` and `csr` are the exceptions: they
# are undefined when null, which switches off the checks that need them
# (POD_NOT_FOUND stands in for the pod's; a request without a CSR is legitimate).
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
# mismatch with a named code.
required_strings := [
	["token", "namespace"],
	["token", "service_account"],
	["token", "pod", "uid"],
	["token", "pod", "name"],
	["config", "provider"],
	["config", "trust_domain"],
	["config", "cert_usage"],
]

required_types := [
	[["config", "dns_suffixes"], "string list"],
	[["config", "allowed_ec_curves"], "string list"],
	[["config", "cert_expiry_minutes"], "number"],
	[["config", "min_rsa_bits"], "number"],
	[["config", "allow_refresh"], "boolean"],
	[["facts", "client_ip"], "string"],
	[["facts", "client_ip_valid"], "boolean"],
	[["facts", "san_ips"], "string list"],
	[["facts", "san_ips_invalid"], "string list"],
	[["facts", "csr_ips_invalid"], "string list"],
]

# Required when the section is present (pod and csr may be null).
optional_types := [
	[["pod", "ips"], "string list"],
	[["csr", "dns"], "string list"],
	[["csr", "ips"], "string list"],
	[["csr", "uris"], "string list"],
	[["csr", "other_sans"], "string list"],
]

input_problems contains "version is not 1" if object.get(input, "version", null) != 1

input_problems contains "kind is not instance or refresh" if not known_kind

known_kind if input.kind in {"instance", "refresh"}

input_problems contains concat("", [section, " is not an object"]) if {
	some section in ["request", "token", "config", "facts"]
	not is_object(object.get(input, section, null))
}

input_problems contains concat("", [concat(".", path), " is missing or empty"]) if {
	some path in required_strings
	not is_nonempty_string(object.get(input, path, null))
}

input_problems contains concat("", [concat(".", path), " is not a ", want]) if {
	some entry in required_types
	path := entry[0]
	want := entry[1]
	not has_type(object.get(input, path, null), want)
}

input_problems contains concat("", [concat(".", path), " is not a ", want]) if {
	some entry in optional_types
	path := entry[0]
	want := entry[1]
	is_object(input[path[0]])
	not has_type(object.get(input, path, null), want)
}

# Absent means none; present, they must be maps.
input_problems contains concat("", ["pod.", field, " is not a map"]) if {
	some field in ["labels", "annotations"]
	value := pod[field]
	not is_object(value)
}

input_problems contains "config.cert_expiry_minutes is not positive" if {
	is_number(cfg.cert_expiry_minutes)
	cfg.cert_expiry_minutes <= 0
}

input_problems contains concat("", ["request.attributes.", name, " is not a string list"]) if {
	some name in ["sanDNS", "sanIP", "sanURI"]
	value := attrs[name]
	not is_string_list(value)
}

is_nonempty_string(value) if {
	is_string(value)
	value != ""
}

has_type(value, "string") if is_string(value)

has_type(value, "string list") if is_string_list(value)

has_type(value, "number") if is_number(value)

has_type(value, "boolean") if is_boolean(value)

reasons contains concat("", ["POLICY_INPUT_INVALID: ", problem]) if {
	some problem in input_problems
}
