# The CSR (when the CA forwarded it): subject, SANs equal to the request's; and
# the key the certificate will carry. Python has verified the CSR's signature and
# parsed it into input.csr, and the key into input.key.
package identityd

import rego.v1

violations contains msg if {
	want := concat(".", [attested_domain, attested_service])
	got := str(csr, "cn")
	got != want
	msg := concat("", ["CSR_CN_MISMATCH: CN '", got, "' is not '", want, "'"])
}

# [kind, the CSR's SANs, the request's SANs]; compared as sets.
csr_san_pairs := [
	["DNS", str_list(csr, "dns"), str_list(attrs, "sanDNS")],
	["IP", str_list(csr, "ips"), str_list(facts, "san_ips")],
	["URI", str_list(csr, "uris"), str_list(attrs, "sanURI")],
]

violations contains concat("", ["CSR_SAN_MISMATCH: ", pair[0], " SANs of the CSR differ from the request's"]) if {
	some pair in csr_san_pairs
	as_set(pair[1]) != as_set(pair[2])
}

violations contains msg if {
	others := str_list(csr, "other_sans")
	count(others) > 0
	msg := concat("", ["CSR_SAN_MISMATCH: unsupported SAN kinds: ", concat(", ", sort(others))])
}

# The key the certificate will carry (input.key): the CSR's, or csrPublicKey when
# ZTS sends no CSR, so these run either way. With neither there is no key to judge.
violations contains concat("", ["CSR_KEY_TYPE_NOT_ALLOWED: ", key_type]) if {
	key_type := str(cert_key, "key_type")
	not key_type in {"RSA", "EC"}
}

rsa_bits_enough if {
	is_number(cert_key.key_bits)
	is_number(cfg.min_rsa_bits)
	cert_key.key_bits >= cfg.min_rsa_bits
}

violations contains msg if {
	str(cert_key, "key_type") == "RSA"
	not rsa_bits_enough
	msg := concat("", [
		"CSR_KEY_WEAK: RSA key of ", number_text(object.get(cert_key, "key_bits", null)),
		" bits, at least ", number_text(object.get(cfg, "min_rsa_bits", null)), " required",
	])
}

allowed_ec_curves := as_set(str_list(cfg, "allowed_ec_curves"))

violations contains concat("", ["CSR_KEY_WEAK: EC curve '", curve, "' is not allowed"]) if {
	str(cert_key, "key_type") == "EC"
	curve := str(cert_key, "curve")
	not curve in allowed_ec_curves
}

# format_int only on numbers: a builtin error is a value in regopy, not undefined.
number_text(value) := text if {
	is_number(value)
	text := format_int(value, 10)
} else := "an unknown number of"
