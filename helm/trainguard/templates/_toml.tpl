{{/*
TOML from a values dict, for the daemon's --config file: scalars and lists of one table first, then its sub-tables
as [a.b] headers, keys in sorted order so that the same values always give the same file (and the same checksum).

Helm reads every number in a values file as a float64, so 1000000 would print as 1e+06, which TOML reads as a
float and the daemon refuses where it wants a whole number: integral floats are written as integers. Nulls are
left out (TOML has none), which also lets `--set config.daemon.x=null` drop a key.
*/}}
{{- define "trainguard.toml" -}}
{{- include "trainguard.toml.table" (dict "path" list "table" .) -}}
{{- end -}}

{{- define "trainguard.toml.table" -}}
{{- $path := .path -}}
{{- if $path }}
[{{ include "trainguard.toml.dotted" $path }}]
{{- end }}
{{- range $key, $value := .table }}
{{- if not (or (kindIs "map" $value) (kindIs "invalid" $value)) }}
{{- $item := dict "value" $value "where" (append $path $key) }}
{{ include "trainguard.toml.key" $key }} = {{ include "trainguard.toml.value" $item }}
{{- end }}
{{- end }}
{{- range $key, $value := .table }}
{{- if kindIs "map" $value }}
{{ include "trainguard.toml.table" (dict "path" (append $path $key) "table" $value) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Bare keys where TOML allows them, quoted otherwise. */}}
{{- define "trainguard.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}
{{- . -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{- define "trainguard.toml.dotted" -}}
{{- $parts := list -}}
{{- range . -}}
{{- $parts = append $parts (include "trainguard.toml.key" .) -}}
{{- end -}}
{{- join "." $parts -}}
{{- end -}}

{{/*
A JSON string is a valid TOML basic string (the same escapes, \uXXXX included), so strings go through toJson.
*/}}
{{- define "trainguard.toml.value" -}}
{{- $v := .value -}}
{{- $where := printf "config.%s" (join "." .where) -}}
{{- if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- ternary "true" "false" $v -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- $v -}}
{{- else if kindIs "float64" $v -}}
{{- if and (eq (floor $v) $v) (lt $v 1e15) (gt $v -1e15) -}}
{{- int64 $v -}}
{{- else -}}
{{- $v -}}
{{- end -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $item := $v -}}
{{- if $i }}, {{ end -}}
{{- if or (kindIs "map" $item) (kindIs "invalid" $item) -}}
{{- fail (printf "%s[%d]: a list in the daemon config holds strings, numbers, booleans or lists" $where $i) -}}
{{- end -}}
{{- include "trainguard.toml.value" (dict "value" $item "where" (append $.where (printf "%d" $i))) -}}
{{- end -}}]
{{- else -}}
{{- fail (printf "%s: cannot be written as TOML (%s)" $where (kindOf $v)) -}}
{{- end -}}
{{- end -}}
