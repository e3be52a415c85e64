{{/* Names are truncated at 63 characters: Kubernetes names and label values are DNS labels. */}}
{{- define "trainguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A release called "trainguard" gives "trainguard", not "trainguard-trainguard". */}}
{{- define "trainguard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "trainguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The labels that select the daemon's pod: never change them, a StatefulSet's selector is immutable. */}}
{{- define "trainguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trainguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "trainguard.labels" -}}
helm.sh/chart: {{ include "trainguard.chart" . }}
{{ include "trainguard.selectorLabels" . }}
app.kubernetes.io/component: daemon
app.kubernetes.io/part-of: trainguard
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "trainguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "trainguard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "trainguard.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The address training jobs send to, inside the cluster. */}}
{{- define "trainguard.grpcAddress" -}}
{{- printf "%s.%s.svc:%v" (include "trainguard.fullname" .) .Release.Namespace (int .Values.service.grpcPort) -}}
{{- end -}}

{{- define "trainguard.httpURL" -}}
{{- printf "http://%s.%s.svc:%v" (include "trainguard.fullname" .) .Release.Namespace (int .Values.service.httpPort) -}}
{{- end -}}

{{/* Where the pod mounts things; the daemon config points at these paths. */}}
{{- define "trainguard.paths" -}}
configDir: /etc/trainguard/config
configFile: /etc/trainguard/config/trainguard.toml
dataDir: /data
db: /data/trainguard.db
tlsDir: /etc/trainguard/tls
authDir: /etc/trainguard/auth
{{- end -}}

{{/*
The daemon config as the pod sees it: .Values.config, plus the settings that only the chart can know (the
Service's URL for links back, the paths of mounted certificates and tokens).
*/}}
{{- define "trainguard.config" -}}
{{- $paths := include "trainguard.paths" . | fromYaml -}}
{{- $cfg := deepCopy (default dict .Values.config) -}}
{{- $daemon := deepCopy (default dict $cfg.daemon) -}}
{{- if not (hasKey $daemon "external_url") -}}
{{- $_ := set $daemon "external_url" (include "trainguard.httpURL" .) -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- $_ := set $daemon "tls_cert_file" (printf "%s/tls.crt" $paths.tlsDir) -}}
{{- $_ := set $daemon "tls_key_file" (printf "%s/tls.key" $paths.tlsDir) -}}
{{- if .Values.tls.clientCA.enabled -}}
{{- $_ := set $daemon "tls_client_ca_file" (printf "%s/client-ca.crt" $paths.tlsDir) -}}
{{- end -}}
{{- end -}}
{{- if .Values.auth.enabled -}}
{{- $_ := set $daemon "auth_tokens_file" (printf "%s/tokens" $paths.authDir) -}}
{{- end -}}
{{- $_ := set $cfg "daemon" $daemon -}}
{{- include "trainguard.toml" $cfg | trim -}}
{{- end -}}

{{- define "trainguard.checkValues" -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.secretName: name the kubernetes.io/tls Secret to mount when tls.enabled is true" -}}
{{- end -}}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) -}}
{{- fail "tls.clientCA.enabled: mutual TLS needs tls.enabled too" -}}
{{- end -}}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) -}}
{{- fail "auth.existingSecret: name the Secret that holds the tokens when auth.enabled is true" -}}
{{- end -}}
{{- end -}}
