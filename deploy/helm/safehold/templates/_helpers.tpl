{{/* Names and labels. */}}
{{- define "safehold.fullname" -}}
{{- if contains "safehold" .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-safehold" .Release.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "safehold.labels" -}}
app.kubernetes.io/name: safehold
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* selector labels of one component: (dict "root" $ "component" "broker") */}}
{{- define "safehold.selector" -}}
app.kubernetes.io/name: safehold
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The generated workload catalogue (files/workloads.json). */}}
{{- define "safehold.catalogue" -}}
{{- $doc := .Files.Get "files/workloads.json" | fromJson -}}
{{- if ne (index $doc "format") "safehold-deploy-workloads-v1" -}}
{{- fail "files/workloads.json: unknown format; regenerate it with `safehold deploy chart-workloads`" -}}
{{- end -}}
{{- toJson $doc -}}
{{- end -}}

{{/* Image of a component: (dict "root" $ "component" "broker") */}}
{{- define "safehold.image" -}}
{{- $v := .root.Values -}}
{{- if eq $v.tee.mode "sgx" -}}
{{- $ref := index $v.images .component | default "" -}}
{{- if not (regexMatch "^[^@ ]+@sha256:[0-9a-f]{64}$" $ref) -}}
{{- fail (printf "tee.mode=sgx: images.%s must name the GSC-signed image of the %s workload by digest (repository@sha256:...)" .component .component) -}}
{{- end -}}
{{- $ref -}}
{{- else -}}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" $v.image.digest) -}}
{{- fail "image.digest must be the image's sha256:<64 hex> digest (tags are mutable)" -}}
{{- end -}}
{{- printf "%s@%s" $v.image.repository $v.image.digest -}}
{{- end -}}
{{- end -}}

{{- define "safehold.brokerHost" -}}
{{- printf "%s-broker" (include "safehold.fullname" .) -}}
{{- end -}}

{{/* Pod env from the catalogue's allow-listed variables: (dict "root" $ "w" $workload) */}}
{{- define "safehold.env" -}}
{{- $root := .root -}}
{{- $broker := include "safehold.brokerHost" $root -}}
{{- range .w.env }}
- name: {{ .name }}
{{- if eq .source "literal" }}
  value: {{ .value | quote }}
{{- else if eq .source "postgres-dsn" }}
  valueFrom:
    secretKeyRef:
      name: {{ required "postgresql.dsnSecret.name is required" $root.Values.postgresql.dsnSecret.name }}
      key: {{ $root.Values.postgresql.dsnSecret.key }}
{{- else if eq .source "broker-url" }}
  value: {{ printf "https://%s:8443" $broker | quote }}
{{- else if eq .source "broker-tls-names" }}
  value: {{ printf "%s %s.%s.svc %s.%s.svc.cluster.local" $broker $broker $root.Release.Namespace $broker $root.Release.Namespace | quote }}
{{- else }}
{{- fail (printf "files/workloads.json: unknown env source %q" .source) }}
{{- end }}
{{- end }}
{{- end -}}
