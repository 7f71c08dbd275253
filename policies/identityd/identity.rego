# Who the token says the caller is, and whether the request asks for exactly that.
package identityd

import rego.v1

token_namespace := str(tok, "namespace")

token_service_account := str(tok, "service_account")

token_pod_uid := str(object.get(tok, "pod", {}), "uid")

token_pod_name := str(object.get(tok, "pod", {}), "name")

# Athenz domain of a namespace (DESIGN §3): "--" -> "-", then "-" -> ".".
# "_" cannot occur in a namespace (an RFC 1123 label), so it is a safe sentinel
# that keeps "--" apart from the single "-" replaced in between.
namespace_domain(namespace) := replace(replace(replace(namespace, "--", "_"), "-", "."), "_", "-")

# The identity the attestation proves; SAN and CN checks use this, not the
# request's claims, so a request cannot widen what it may be granted.
attested_domain := namespace_domain(token_namespace)

attested_service := token_service_account

# The domain as one DNS label: "." -> "-" (sports.web -> sports-web).
attested_dns_label := replace(attested_domain, ".", "-")

violations contains msg if {
	got := str(req, "provider")
	want := str(cfg, "provider")
	got != want
	msg := concat("", ["PROVIDER_MISMATCH: request names '", got, "', this provider is '", want, "'"])
}

violations contains msg if {
	got := str(req, "domain")
	got != attested_domain
	msg := concat("", [
		"DOMAIN_MISMATCH: request domain '", got, "', namespace '", token_namespace,
		"' maps to '", attested_domain, "'",
	])
}

violations contains msg if {
	got := str(req, "service")
	got != attested_service
	msg := concat("", [
		"SERVICE_MISMATCH: request service '", got,
		"', token service account '", attested_service, "'",
	])
}

# The request's names must be valid Athenz names (ZTS's InstanceConfirmation: domain
# is a DomainName, service a SimpleName). Matching the token is not enough: a
# Kubernetes service account may contain dots, and domain "sports" with service
# "web.api" has the same CN, sports.web.api, as service "api" of domain
# "sports.web". str() gives "" for an absent or non-string value, which does not
# match, so regex.match only ever sees a string. fast.rego checks the same sets
# with cheaper builtins; the fast-path tests hold the two to each other.
violations contains msg if {
	got := str(req, "domain")
	not regex.match(`^[a-zA-Z0-9_][a-zA-Z0-9_-]*(\.[a-zA-Z0-9_][a-zA-Z0-9_-]*)*$`, got)
	msg := concat("", [
		"DOMAIN_NAME_INVALID: request domain '", got,
		"' is not an Athenz domain name (simple names joined by '.')",
	])
}

violations contains msg if {
	got := str(req, "service")
	not regex.match(`^[a-zA-Z0-9_][a-zA-Z0-9_-]*$`, got)
	msg := concat("", [
		"SERVICE_NAME_INVALID: request service '", got,
		"' is not an Athenz simple name ([a-zA-Z0-9_][a-zA-Z0-9_-]*, no '.')",
	])
}

request_instance_id := str(attrs, "instanceId")

violations contains "INSTANCE_ID_MISSING: attribute instanceId is absent or empty" if {
	request_instance_id == ""
}

violations contains msg if {
	request_instance_id != ""
	request_instance_id != token_pod_uid
	msg := concat("", [
		"INSTANCE_ID_MISMATCH: instanceId '", request_instance_id,
		"' is not the token's pod uid '", token_pod_uid, "'",
	])
}
