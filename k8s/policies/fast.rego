# One pass over a legitimate request: `fast_allow` holds only when none of the
# default checks (`violations`, in the other modules) can fire, so decision.rego
# skips evaluating them one by one. It reads every field once into a local and
# compares locals, which is what regopy does cheaply; rules, helper functions
# and generic path walks are what it does slowly.
#
# The contract is one-way: fast_allow => count(violations) == 0. It may be
# stricter than the checks (a shape it does not recognise, a CSR whose SANs come
# in another order than the request's, a token without a node field): then it
# is simply false and the checks decide. tests/policy checks the implication
# and that decisions are the same with and without it.
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

	# Identity: the token's claims, required non-empty strings; the request
	# and the pod record must name exactly them.
	namespace := token.namespace
	is_string(namespace)
	namespace != ""
	record.namespace == namespace
	service_account := token.service_account
	is_string(service_account)
	service_account != ""
	request.service == service_account
	record.service_account == service_account
	token_pod := token.pod
	pod_name := token_pod.name
	is_string(pod_name)
	pod_name != ""
	record.name == pod_name
	instance_id := attributes.instanceId
	is_string(instance_id)
	instance_id != ""
	token_pod.uid == instance_id
	record.uid == instance_id
	provider := config.provider
	is_string(provider)
	provider != ""
	request.provider == provider
	domain := replace(replace(replace(namespace, "--", "_"), "-", "."), "_", "-")
	request.domain == domain

	# The pod record: running, not terminating, on the token's node.
	record.phase == "Running"
	record.terminating == false
	fast_node(token.node, record.node)
	is_object(record.labels)
	is_object(record.annotations)
	ips_of_pod := record.ips
	is_array(ips_of_pod)
	every ip in ips_of_pod {
		is_string(ip)
	}

	# Configuration types.
	trust_domain := config.trust_domain
	is_string(trust_domain)
	trust_domain != ""
	usage := config.cert_usage
	is_string(usage)
	usage != ""
	suffixes := config.dns_suffixes
	is_array(suffixes)
	every suffix in suffixes {
		is_string(suffix)
	}
	curves := config.allowed_ec_curves
	is_array(curves)
	every curve in curves {
		is_string(curve)
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
	every ip in san_ips {
		ip in ips_of_pod
	}
	fact.san_ips_invalid == []
	fact.csr_ips_invalid == []
	attributes.sanIP == san_ips

	# DNS and URI SANs: the allowed forms (san.rego), built once.
	dns_label := replace(domain, ".", "-")
	dns_allowed := {name |
		some suffix in suffixes
		some name in [
			concat(".", [service_account, dns_label, suffix]),
			concat(".", ["*", service_account, dns_label, suffix]),
			concat(".", [instance_id, "instanceid", "athenz", suffix]),
		]
	}
	dns := attributes.sanDNS
	is_array(dns)
	every name in dns {
		name in dns_allowed
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

	fast_csr(input.csr, concat(".", [domain, service_account]), dns, san_ips, uris, config)
}

fast_kind("instance") := true

fast_kind("refresh") if {
	input.config.allow_refresh == true
	not refresh_disabled_by_pod
}

# A token without a node skips the node check; one with a node names the pod's.
fast_node(null, _) := true

fast_node(node, pod_node) if node.name == pod_node

# No CSR, or one that asks for exactly the request's SANs (same order), the
# attested CN, nothing else, and an allowed key.
fast_csr(null, _, _, _, _, _) := true

fast_csr(request_csr, cn, dns, ips, uris, config) if {
	request_csr.cn == cn
	request_csr.dns == dns
	request_csr.ips == ips
	request_csr.uris == uris
	request_csr.other_sans == []
	fast_key(request_csr.key_type, request_csr, config)
}

fast_key("EC", request_csr, config) if request_csr.curve in config.allowed_ec_curves

fast_key("RSA", request_csr, config) if {
	bits := request_csr.key_bits
	is_number(bits)
	bits >= config.min_rsa_bits
}
