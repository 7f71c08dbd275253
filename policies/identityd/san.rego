# Subject alternative names: the request's attributes and, when a CSR was sent,
# the CSR's own. IPs come normalised from Python (input.facts, csr.ips, pod.ips).
package identityd

import rego.v1

pod_ips := as_set(str_list(pod, "ips"))

# clientIP
violations contains "CLIENT_IP_MISMATCH: clientIP is absent or not an IP" if {
	object.get(facts, "client_ip_valid", false) != true
}

violations contains msg if {
	facts.client_ip_valid == true
	pod
	ip := str(facts, "client_ip")
	not ip in pod_ips
	msg := concat("", ["CLIENT_IP_MISMATCH: ", ip, " is not an IP of pod ", pod_ref])
}

# SAN IP: pod IPs only. Without a pod, POD_NOT_FOUND already denies.
violations contains msg if {
	pod
	some ip in str_list(facts, "san_ips")
	not ip in pod_ips
	msg := concat("", ["SAN_IP_NOT_ALLOWED: ", ip, " is not an IP of pod ", pod_ref])
}

violations contains msg if {
	pod
	some ip in str_list(csr, "ips")
	not ip in pod_ips
	msg := concat("", ["SAN_IP_NOT_ALLOWED: CSR IP ", ip, " is not an IP of pod ", pod_ref])
}

violations contains concat("", ["SAN_IP_NOT_ALLOWED: '", item, "' is not an IP"]) if {
	some item in str_list(facts, "san_ips_invalid")
}

violations contains concat("", ["SAN_IP_NOT_ALLOWED: CSR IP '", item, "' is not an IP"]) if {
	some item in str_list(facts, "csr_ips_invalid")
}

# SAN DNS: <service>.<domain label>.<suffix>, its "*." wildcard, and
# <instance id>.instanceid.athenz.<suffix>, for each configured suffix.
allowed_dns contains name if {
	some suffix in str_list(cfg, "dns_suffixes")
	some name in [
		concat(".", [attested_service, attested_dns_label, suffix]),
		concat(".", ["*", attested_service, attested_dns_label, suffix]),
		concat(".", [token_pod_uid, "instanceid", "athenz", suffix]),
	]
}

violations contains concat("", ["SAN_DNS_NOT_ALLOWED: ", name]) if {
	some name in str_list(attrs, "sanDNS")
	not name in allowed_dns
}

violations contains concat("", ["SAN_DNS_NOT_ALLOWED: CSR DNS ", name]) if {
	some name in str_list(csr, "dns")
	not name in allowed_dns
}

# SAN URI: the Athenz SPIFFE form, the Kubernetes SPIFFE form, and the
# instance-id URI of this provider and pod.
allowed_uris := {
	concat("", ["spiffe://", attested_domain, "/sa/", attested_service]),
	concat("", [
		"spiffe://", str(cfg, "trust_domain"), "/ns/", token_namespace,
		"/sa/", token_service_account,
	]),
	concat("", ["athenz://instanceid/", str(cfg, "provider"), "/", token_pod_uid]),
}

violations contains concat("", ["SAN_URI_NOT_ALLOWED: ", uri]) if {
	some uri in str_list(attrs, "sanURI")
	not uri in allowed_uris
}

violations contains concat("", ["SAN_URI_NOT_ALLOWED: CSR URI ", uri]) if {
	some uri in str_list(csr, "uris")
	not uri in allowed_uris
}
