# One pass over a legitimate request: `fast_allow` holds only when none of the
# default checks (`violations`, in the other modules) can fire, so decision.rego
# does not evaluate them one by one. It reads each field once into a local and
# compares locals: in regopy every rule or function call, object comparison and
# field lookup has a fixed cost of microseconds, and the checks make hundreds.
#
# The contract is one-way: fast_allow => count(violations) == 0. It may be
# stricter than the checks (a shape it does not vouch for, such as CSR SANs in
# another order than the request's): then it is false and the checks decide, so
# the decision is the same either way. tests/policy/test_policy_fast_path.py
# checks the implication field by field and the decisions with and without it.
#
# Written for regopy as well as OPA (policies/README.md, Performance): a type
# check before each builtin call, so soundness never rests on how an engine
# treats a builtin's type error; `is_null`/`is_object` rather than comparing an
# object with null (regopy serialises the object to compare it); and inside an
# `every` body no local named like a field read there (regopy reads `x.name`
# as x[name] when the body has a local `name`).
package identityd

import rego.v1

fast_allow if {
	input.version == 1
	fast_kind(input.kind)
	request := input.request
	token := input.token
	record := input.pod
	config := input.config
	fact := input.facts
	attributes := request.attributes

	# Identity: the token's claims (non-empty strings, checked below); the
	# request and the pod record must name exactly them.
	namespace := token.namespace
	is_string(namespace)
	record.namespace == namespace
	service_account := token.service_account
	is_string(service_account)
	request.service == service_account
	record.service_account == service_account
	token_pod := token.pod
	pod_name := token_pod.name
	is_string(pod_name)
	record.name == pod_name
	instance_id := attributes.instanceId
	is_string(instance_id)
	token_pod.uid == instance_id
	record.uid == instance_id
	provider := config.provider
	is_string(provider)
	request.provider == provider
	domain := replace(replace(replace(namespace, "--", "_"), "-", "."), "_", "-")
	request.domain == domain

	# Athenz names (identity.rego): the domain a DomainName, the service a
	# SimpleName. Same sets as the checks' regexes, without regex.match, which
	# costs regopy ~20-40 us a call: "." + domain + "." + service holds only name
	# characters and dots, and no part is empty or starts with "-"; the service
	# has no "." of its own.
	not contains(service_account, ".")
	names := concat(".", ["", domain, service_account])
	trim(names, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.") == ""
	not contains(names, "..")
	not contains(names, ".-")

	# The pod record: running, not terminating, on the token's node.
	record.phase == "Running"
	record.terminating == false
	every token_node in [n | n := token.node; is_object(n)] {
		token_node.name == record.node
	}
	is_object(record.labels)
	is_object(record.annotations)
	ips_of_pod := record.ips
	is_array(ips_of_pod)
	every pod_ip in ips_of_pod {
		is_string(pod_ip)
	}

	# Configuration types, and the required strings non-empty.
	trust_domain := config.trust_domain
	is_string(trust_domain)
	usage := config.cert_usage
	is_string(usage)
	not "" in [namespace, service_account, pod_name, instance_id, provider, trust_domain, usage]
	suffixes := config.dns_suffixes
	is_array(suffixes)
	every dns_suffix in suffixes {
		is_string(dns_suffix)
	}
	curves := config.allowed_ec_curves
	is_array(curves)
	every ec_curve in curves {
		is_string(ec_curve)
	}
	expiry := config.cert_expiry_minutes
	is_number(expiry)
	expiry > 0
	is_number(config.min_rsa_bits)
	is_boolean(config.allow_refresh)

	# IPs: clientIP and every SAN IP is one of the pod's (strings, so these
	# lists are string lists too); nothing that failed to parse.
	fact.client_ip_valid == true
	fact.client_ip in ips_of_pod
	san_ips := fact.san_ips
	is_array(san_ips)
	every san_ip in san_ips {
		san_ip in ips_of_pod
	}
	fact.san_ips_invalid == []
	fact.csr_ips_invalid == []
	attributes.sanIP == san_ips

	# DNS and URI SANs: the allowed forms (san.rego), built once.
	dns_label := replace(domain, ".", "-")
	dns_allowed := {form |
		some suffix in suffixes
		some form in [
			concat(".", [service_account, dns_label, suffix]),
			concat(".", ["*", service_account, dns_label, suffix]),
			concat(".", [instance_id, "instanceid", "athenz", suffix]),
		]
	}
	dns := attributes.sanDNS
	is_array(dns)
	every dns_name in dns {
		dns_name in dns_allowed
	}
	uris_allowed := {
		concat("", ["spiffe://", domain, "/sa/", service_account]),
		concat("", ["spiffe://", trust_domain, "/ns/", namespace, "/sa/", service_account]),
		concat("", ["athenz://instanceid/", provider, "/", instance_id]),
	}
	uris := attributes.sanURI
	is_array(uris)
	every uri in uris {
		uri in uris_allowed
	}

	# A CSR (none when it is not an object, as csr.rego): exactly the request's
	# SANs in the same order, the attested CN, nothing else.
	every request_csr in [c | c := input.csr; is_object(c)] {
		request_csr.cn == concat(".", [domain, service_account])
		request_csr.dns == dns
		request_csr.ips == san_ips
		request_csr.uris == uris
		request_csr.other_sans == []
	}

	# The key the certificate will carry (input.key, csr.rego): an allowed one. A
	# request with no key at all (null) is left to the checks, as is any key that
	# is not an object: both are rare, and this keeps the common case one call.
	cert := input.key
	fast_key(cert.key_type, cert.curve, cert.key_bits, curves, config.min_rsa_bits)
}

# A refresh needs it allowed by the configuration and not refused by the pod.
fast_kind("instance") := true

fast_kind("refresh") if {
	input.config.allow_refresh == true
	not refresh_disabled_by_pod
}

# Key type, then its strength (csr.rego).
fast_key("EC", curve, _, curves, _) if curve in curves

fast_key("RSA", _, bits, _, min_bits) if {
	is_number(bits)
	bits >= min_bits
}
